"""Data specs and datasets: bundled digits, CIFAR-10/100 pickles, ImageFolder trees."""

import os
import pickle
import warnings

import numpy as np
import pytest
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from patfast.data import ArrayImages, DataSpec, FolderImages, ImageData, load_data, parse_data_spec
from patfast.errors import UserError


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


# ----------------------------------------------------------------------------------------------------------- specs


def test_parse_data_spec_forms(tmp_path):
    assert parse_data_spec("digits") == DataSpec("digits")
    for kind in ("cifar10", "cifar100", "imagefolder"):
        spec = parse_data_spec(f"{kind}:{tmp_path}")
        assert spec == DataSpec(kind, str(tmp_path))
        assert str(spec) == f"{kind}:{tmp_path}"


@pytest.mark.parametrize("spec", ["mnist", "cifar:/tmp", "digits:/tmp", "", "imagenet:/tmp"])
def test_parse_data_spec_unknown_lists_forms(spec):
    with pytest.raises(UserError, match="digits, cifar10:DIR, cifar100:DIR, imagefolder:DIR"):
        parse_data_spec(spec)


def test_parse_data_spec_needs_dir(tmp_path):
    with pytest.raises(UserError, match=r"needs a directory: cifar10:DIR"):
        parse_data_spec("cifar10")
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=f"directory not found: {missing}"):
        parse_data_spec(f"cifar100:{missing}")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(UserError, match="directory not found"):
        parse_data_spec(f"imagefolder:{a_file}")


def test_parse_data_spec_bare_directory_suggests_the_spec(tmp_path, cifar100_dir):
    images = tmp_path / "pets"
    images.mkdir()
    with pytest.raises(UserError, match=f"bare directory, not a spec; .*use imagefolder:{images},") as e:
        parse_data_spec(str(images))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=f"CIFAR-100 python batches, so use cifar100:{cifar100_dir}$"):
        parse_data_spec(str(cifar100_dir))
    with pytest.raises(UserError, match=f"CIFAR-100 python batches, so use cifar100:{tmp_path}$"):
        parse_data_spec(str(tmp_path))  # the parent of cifar-100-python/, as cifar100:DIR accepts


def test_parse_data_spec_bare_cifar10_directory(cifar10_dir):
    with pytest.raises(UserError, match=f"CIFAR-10 python batches, so use cifar10:{cifar10_dir}$"):
        parse_data_spec(str(cifar10_dir))


# ---------------------------------------------------------------------------------------------------------- digits


def test_digits_fixed_stratified_split(digits):
    assert isinstance(digits, ImageData)
    assert (len(digits.train), len(digits.test)) == (1437, 360)
    assert digits.num_classes == 10 and digits.classes == [str(i) for i in range(10)]
    train_counts = np.bincount(digits.train.labels, minlength=10)
    test_counts = np.bincount(digits.test.labels, minlength=10)
    assert train_counts.min() > 0 and test_counts.min() > 0
    np.testing.assert_allclose(test_counts / (train_counts + test_counts), 0.2, atol=0.02)
    again = load_data("digits")
    np.testing.assert_array_equal(again.train.images, digits.train.images)
    np.testing.assert_array_equal(again.test.labels, digits.test.labels)


def test_digits_pixels(digits):
    images = digits.train.images
    assert images.dtype == np.uint8 and images.shape == (1437, 8, 8, 3)
    assert images.min() == 0 and images.max() == 255
    assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
    # sklearn's 0..16 scale maps onto 0..255: 17 grey levels
    assert len(np.unique(images)) == 17
    px = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(digits.mean, px.mean(0), rtol=1e-6)
    np.testing.assert_allclose(digits.std, px.std(0), rtol=1e-6)
    assert digits.native_size == 8 and len(digits.mean) == len(digits.std) == 3


def test_digits_sample_is_pil_rgb(digits):
    image, label = digits.test.get(5)
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (8, 8)
    assert isinstance(label, int) and label == digits.test.labels[5]
    np.testing.assert_array_equal(np.asarray(image), digits.test.images[5])


def test_split_names(digits):
    assert digits.split("train") is digits.train
    assert digits.split("test") is digits.test and digits.split("val") is digits.test
    with pytest.raises(UserError, match="unknown split 'valid'"):
        digits.split("valid")


# ----------------------------------------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("form", ["folder", "parent"])
def test_cifar10(cifar10_dir, form):
    root = cifar10_dir if form == "folder" else cifar10_dir.parent
    data = load_data(f"cifar10:{root}")
    assert (len(data.train), len(data.test)) == (15, 4)
    assert data.num_classes == 10 and data.classes[0] == "airplane" and data.classes[9] == "truck"
    assert data.train.images.shape == (15, 32, 32, 3) and data.train.images.dtype == np.uint8
    assert data.train.labels.tolist() == [k % 10 for k in range(15)]
    assert data.test.labels.tolist() == [9, 8, 7, 6]
    # CIFAR rows are channel planes: image k of the train split is (k, 100 + k, 200 + k) everywhere
    assert data.train.images[7, 31, 0].tolist() == [7, 107, 207]
    image, label = data.test.get(1)
    assert image.size == (32, 32) and np.asarray(image)[0, 0].tolist() == [51, 151, 251] and label == 8
    assert data.mean == (0.4914, 0.4822, 0.4465) and data.std == (0.2470, 0.2435, 0.2616)
    assert data.native_size == 32


@pytest.mark.parametrize("form", ["folder", "parent"])
def test_cifar100(cifar100_dir, form):
    root = cifar100_dir if form == "folder" else cifar100_dir.parent
    data = load_data(f"cifar100:{root}")
    assert (len(data.train), len(data.test)) == (6, 4)
    assert data.num_classes == 100 and data.classes[:2] == ["class00", "class01"]
    assert data.train.labels.tolist() == [99, 98, 97, 96, 95, 94]  # fine labels, not coarse
    assert data.test.labels.tolist() == [0, 7, 14, 21]
    assert data.test.images[3, 5, 9].tolist() == [53, 153, 253]
    assert data.mean == (0.5071, 0.4865, 0.4409) and data.std == (0.2673, 0.2564, 0.2762)


def test_cifar_truncated_pickle_names_file(cifar10_dir):
    path = cifar10_dir / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match=f"truncated CIFAR pickle {path}"):
        load_data(f"cifar10:{cifar10_dir}")


def test_cifar_missing_files(cifar10_dir, cifar100_dir, tmp_path):
    os.remove(cifar10_dir / "test_batch")
    with pytest.raises(UserError, match="lacks test_batch"):
        load_data(f"cifar10:{cifar10_dir}")
    with pytest.raises(UserError, match="no CIFAR-10 python batches .* cifar-10-batches-py"):
        load_data(f"cifar10:{cifar100_dir}")  # a CIFAR-100 folder given as CIFAR-10
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no CIFAR-100 python batches"):
        load_data(f"cifar100:{empty}")


def test_cifar_pickle_with_code_is_refused(cifar100_dir):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(cifar100_dir / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": Evil()}, f, protocol=2)
    with pytest.raises(UserError, match="meta: .*refusing to load"):
        load_data(f"cifar100:{cifar100_dir}")


# ----------------------------------------------------------------------------------------------------- ImageFolder


def test_imagefolder(folder_dir):
    data = load_data(f"imagefolder:{folder_dir}")
    assert data.classes == ["cat", "dog", "emu"] and data.num_classes == 3
    assert isinstance(data.train, FolderImages) and (len(data.train), len(data.test)) == (9, 6)
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert data.split("val") is data.test
    image, label = data.test.get(3)
    assert image.mode == "RGB" and image.size == (12, 10) and label == 1
    assert np.asarray(image)[0, 0].tolist() == [80, 1, 0]
    assert data.mean == tuple(IMAGENET_DEFAULT_MEAN) and data.std == tuple(IMAGENET_DEFAULT_STD)
    assert data.native_size is None


def test_imagefolder_grey_image_becomes_rgb(folder_dir):
    Image.new("L", (5, 5), 77).save(folder_dir / "train" / "cat" / "grey.png")
    data = load_data(f"imagefolder:{folder_dir}")
    image, _ = data.train.get(data.train.samples.index((str(folder_dir / "train" / "cat" / "grey.png"), 0)))
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [77, 77, 77]


def test_imagefolder_notes_the_skipped_files(folder_dir):
    assert load_data(f"imagefolder:{folder_dir}").notes == []
    Image.new("P", (4, 4)).save(folder_dir / "train" / "cat" / "a.gif")
    Image.new("P", (4, 4)).save(folder_dir / "val" / "dog" / "b.GIF")
    (folder_dir / "train" / "dog" / "notes.txt").write_text("not an image")
    (folder_dir / "train" / "readme.md").write_text("outside the classes")
    data = load_data(f"imagefolder:{folder_dir}")
    assert (len(data.train), len(data.test)) == (9, 6)
    assert data.notes == [
        "imagefolder: skipped 3 files that are not images (.gif: 2, .txt: 1; e.g. train/cat/a.gif); "
        "only .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp files are read",
        "imagefolder: skipped 1 file outside the class folders (e.g. train/readme.md); images go in train/<class>/ "
        "and val/<class>/"]


def _pixel(data, path):
    image, _ = data.train.get(data.train.samples.index((str(path), 0)))
    assert image.mode == "RGB"
    return np.asarray(image)[0].tolist()


def test_imagefolder_alpha_is_composited_on_white(folder_dir):
    cat = folder_dir / "train" / "cat"
    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 0))  # transparent red: white, not red
    rgba.putpixel((1, 0), (0, 0, 255, 128))  # half-transparent blue over white
    rgba.putpixel((2, 0), (0, 200, 0, 255))  # opaque: as stored
    rgba.save(cat / "rgba.png")
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (50, 255))
    la.save(cat / "la.png")
    palette = Image.new("P", (3, 1), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 759)
    palette.putpixel((1, 0), 1)
    palette.putpixel((2, 0), 2)
    palette.save(cat / "p_bytes.png", transparency=bytes([0, 128]))  # per-entry alphas: red 0, green 128, blue 255
    palette.save(cat / "p_index.png", transparency=0)  # one transparent index: red
    Image.new("RGB", (1, 1), (10, 20, 30)).save(cat / "rgb_key.png", transparency=(10, 20, 30))
    data = load_data(f"imagefolder:{folder_dir}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's "Palette images with Transparency expressed in bytes" warning
        assert _pixel(data, cat / "rgba.png") == [[255, 255, 255], [127, 127, 255], [0, 200, 0]]
        assert _pixel(data, cat / "la.png") == [[255, 255, 255], [50, 50, 50]]
        assert _pixel(data, cat / "p_bytes.png") == [[255, 255, 255], [127, 255, 127], [0, 0, 255]]
        assert _pixel(data, cat / "p_index.png") == [[255, 255, 255], [0, 255, 0], [0, 0, 255]]
        assert _pixel(data, cat / "rgb_key.png") == [[255, 255, 255]]


def test_imagefolder_pil_warnings_name_the_file(folder_dir, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12 x 10 images: PIL's DecompressionBombWarning
    data = load_data(f"imagefolder:{folder_dir}")
    with pytest.warns(Image.DecompressionBombWarning) as caught:
        image, _ = data.test.get(0)
    assert image.size == (12, 10)
    assert [str(w.message).split(": ")[0] for w in caught] == [str(folder_dir / "val" / "cat" / "0.png")]


def test_imagefolder_errors(folder_dir, tmp_path):
    import shutil

    shutil.rmtree(folder_dir / "val")
    with pytest.raises(UserError, match="missing val/ folder"):
        load_data(f"imagefolder:{folder_dir}")
    (folder_dir / "val").mkdir()
    with pytest.raises(UserError, match="val/ classes differ .*missing from val/: cat, dog, emu"):
        load_data(f"imagefolder:{folder_dir}")
    for cls in ("cat", "dog", "emu", "yak"):
        (folder_dir / "val" / cls).mkdir()
    with pytest.raises(UserError, match="not in train/: yak"):
        load_data(f"imagefolder:{folder_dir}")
    (folder_dir / "val" / "yak").rmdir()
    with pytest.raises(UserError, match="no images .* in .*val"):
        load_data(f"imagefolder:{folder_dir}")

    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(UserError, match="no class sub-folders"):
        load_data(f"imagefolder:{empty}")
    (empty / "train" / "a").mkdir()
    (empty / "train" / "a" / "notes.txt").write_text("not an image")
    (empty / "val" / "a").mkdir()
    with pytest.raises(UserError, match="no images .* in train/ classes a"):
        load_data(f"imagefolder:{empty}")


def test_imagefolder_corrupt_image(folder_dir):
    (folder_dir / "val" / "dog" / "0.png").write_bytes(b"not a png")
    data = load_data(f"imagefolder:{folder_dir}")
    with pytest.raises(UserError, match=r"cannot decode image .*dog/0\.png"):
        data.test.get(2)


def test_array_images_checks_inputs():
    with pytest.raises(ValueError, match="uint8"):
        ArrayImages(np.zeros((2, 4, 4, 3), np.float32), np.zeros(2), classes=["a"], mean=(0,) * 3, std=(1,) * 3,
                    native_size=4, name="x")
