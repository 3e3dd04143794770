"""Every results folder the README quotes says which commit made its figures, and the README names that commit
(issue 16 item 6: figures made by an older version were quoted as today's)."""

import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MADE_BY = re.compile(r"made by patfast commit ([0-9a-f]{7,40})(\+changes)?", re.IGNORECASE)


def _records(folder: str) -> list[tuple[str, str]]:
    """(file, its made-by text) for every made_by.txt and table.md under folder."""
    found = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name in ("made_by.txt", "table.md"):
                with open(os.path.join(dirpath, name)) as f:
                    found.append((os.path.join(dirpath, name), f.read()))
    return found


def test_every_results_folder_the_readme_quotes_records_the_commit_that_made_it():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    folders = sorted(set(re.findall(r"benchmarks/results/([\w-]+)", readme)))
    assert folders
    in_git = os.path.isdir(os.path.join(ROOT, ".git"))
    for name in folders:
        records = _records(os.path.join(ROOT, "benchmarks", "results", name))
        assert records, f"benchmarks/results/{name} records no made_by.txt / table.md"
        for path, text in records:
            m = MADE_BY.search(text)
            assert m, f"{path} does not say which commit made it"
            assert not m.group(2), f"{path} was made from a tree with uncommitted changes"
            assert m.group(1) in readme, f"the README does not name commit {m.group(1)} of {path}"
            if in_git:
                known = subprocess.run(["git", "-C", ROOT, "cat-file", "-e", f"{m.group(1)}^{{commit}}"])
                assert known.returncode == 0, f"{path}: commit {m.group(1)} is not in this repository"
