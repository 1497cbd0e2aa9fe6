"""Packaging: both packages ship, and ``import kernels`` is ours (PyPI has an unrelated ``kernels``)."""

from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]


def test_setup_finds_both_packages():
    found = find_packages(where=str(REPO), include=["hybrid_distill", "hybrid_distill.*", "kernels", "kernels.*"])
    assert sorted(found) == ["hybrid_distill", "kernels"]


def test_setup_py_declares_the_packages_it_ships():
    text = (REPO / "setup.py").read_text()
    assert 'name="hybrid-distill"' in text
    assert '"hybrid_distill"' in text and '"kernels"' in text


def test_import_kernels_resolves_to_this_repository():
    import kernels

    assert Path(kernels.__file__).resolve().parent == REPO / "kernels"
    assert hasattr(kernels, "relation_loss") and hasattr(kernels, "gather_relations")
