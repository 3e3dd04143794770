"""The two PAT variants: `paper` (what the paper describes) and `official` (what the published code computes).

Each of SPEC section 6's five differences is one switch, so each can be tested and toggled alone; a sixth matches
the authors' float32 rounding of the sinusoid table.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class PatVariant:
    token_reshape_bug: bool = False  # 1: after a prompt, map -> tokens by plain reshape (scrambles tokens)
    se_gate_only: bool = False  # 2: SE returns its sigmoid gate only: prompts become per-channel biases
    pos_by_batch_index: bool = False  # 3: positional term sliced by batch index (B, 1, d) instead of by token
    class_token_last: bool = False  # 4: when L is not a square, the LAST token is the class token
    teacher_train_first_batch: bool = False  # 5: the clean teacher forward of each epoch's first batch in train mode
    float32_pos_table: bool = False  # not a bug: the sinusoid table computed in float32 as the authors do (see raa.py)

    @classmethod
    def named(cls, name: str) -> PatVariant:
        if name == "paper":
            return cls()
        if name == "official":
            return cls(**{f.name: True for f in fields(cls)})
        raise ValueError(f"unknown PAT variant {name!r} (choose paper or official)")

    @property
    def class_token_rule(self) -> str:
        return "last" if self.class_token_last else "first"

    @property
    def token_return_rule(self) -> str:
        return "reshape" if self.token_reshape_bug else "transpose"
