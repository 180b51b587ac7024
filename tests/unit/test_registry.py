import pytest

from g2d import registry
from g2d.methods.base import Method


def test_builtin_names_listed():
    assert {"joint", "unimodal"} <= set(registry.list_methods())
    assert {"cremad", "avmnist", "vggsound", "urfunny", "iemocap", "misme"} <= set(registry.list_datasets())


def test_duplicate_name_raises():
    registry.load_all()

    class A(Method):
        pass

    with pytest.raises(registry.RegistryError, match="duplicate method name 'joint'"):
        registry.register_method("joint")(A)
    assert registry.get_method("joint") is not A


def test_unknown_method_lists_valid_ones():
    with pytest.raises(registry.RegistryError) as e:
        registry.get_method("nope")
    msg = str(e.value)
    assert "unknown method 'nope'" in msg and "joint" in msg and "unimodal" in msg


def test_plugin_composes_subclass(monkeypatch):
    registry.load_all()
    monkeypatch.setitem(registry._PLUGINS, "twice", lambda cls: type(f"Twice{cls.__name__}", (cls,), {}))
    cls = registry.get_method("joint+twice")
    assert issubclass(cls, registry.get_method("joint")) and cls.name == "joint+twice"
    registry._METHODS.pop("joint+twice")


def test_cli_list_prints_methods(capsys):
    from g2d.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "joint" in out and "cremad" in out
