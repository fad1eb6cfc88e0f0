"""`LibfusePatch`'s assumptions that hold without a mount: the installed
libfuse is a release whose layouts were verified, pyfuse3 keeps the
symbols the patch looks up, and an unverified release is left unpatched.
(The patch at work: tests/test_fs_mount.py's fallocate test. The reader:
tests/test_fs_reader.py.)"""

from __future__ import annotations

import pyfuse3

from dstfuse.fusehooks import LibfusePatch, _elf_symbols


def test_the_installed_libfuse_is_a_release_whose_layout_was_verified():
    """Fails after a libfuse upgrade: check `fuse_lowlevel_ops` and
    `fuse_conn_info` of the new release against LibfusePatch's constants,
    then add it to VERIFIED_LIBFUSE."""
    assert LibfusePatch.load_libfuse().fuse_version() in LibfusePatch.VERIFIED_LIBFUSE


def test_the_installed_pyfuse3_keeps_the_symbols_the_patch_looks_up():
    symbols = _elf_symbols(pyfuse3.__file__, set(LibfusePatch.SYMBOLS))
    assert set(symbols) == LibfusePatch.SYMBOLS


def test_an_unverified_libfuse_release_is_left_unpatched(monkeypatch, caplog):
    monkeypatch.setattr(LibfusePatch, "VERIFIED_LIBFUSE", frozenset())
    patch = LibfusePatch(lambda *request: None, 64)
    assert patch.apply() is False
    assert not patch.installed
    assert "layout is not verified" in caplog.text
