"""The isolation policy and the snippets' filesystem plan.

One `IsolationPolicy` is read by the Python side and the C++ core alike: both know the same
fields, and the core refuses JSON that does not match. The plan of what a snippet sees
(`cir.sandbox.rootfs`) is checked on a made-up tree: symlink chains recreated, nested paths
bound once, package directories emptied but for the wanted packages, nothing taken from
sys.path. `extra_readonly_paths` shows exactly what it names, read-only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from cir import _sandbox
from cir.config_loader import ConfigError
from cir.sandbox import IsolationPolicy, Sandbox, SandboxConfig, rootfs


def test_python_and_cpp_read_the_same_policy_fields():
    fields = {f.name for f in dataclasses.fields(IsolationPolicy)}
    assert fields == set(_sandbox.policy_fields())
    policy = IsolationPolicy(extra_readonly_paths=("/usr",), work_dir_inodes=100)
    _sandbox.check_policy(policy.to_json())  # accepted as it is
    assert IsolationPolicy.from_json(policy.to_json()) == policy


@pytest.mark.parametrize(
    "change, message",
    [
        ({"surprise": 1}, 'unknown field "surprise"'),
        ({"network": "yes"}, '"network" must be a boolean'),
        ({"work_dir_bytes": -1}, '"work_dir_bytes" must be a non-negative integer'),
        ({"extra_readonly_paths": ["relative/path"]}, "must be absolute"),
    ],
)
def test_cpp_rejects_a_policy_that_does_not_match(change, message):
    data = json.loads(IsolationPolicy().to_json())
    data.update(change)
    with pytest.raises(ValueError, match=message):
        _sandbox.check_policy(json.dumps(data))
    del data[next(iter(change))]
    if "surprise" not in change:
        with pytest.raises(ValueError, match="is missing"):
            _sandbox.check_policy(json.dumps(data))


def test_policy_and_config_name_the_bad_value(tmp_path):
    with pytest.raises(ValueError, match="'/' would show the whole host"):
        IsolationPolicy(extra_readonly_paths=("/",))
    with pytest.raises(ValueError, match="does not exist"):
        IsolationPolicy(extra_readonly_paths=(str(tmp_path / "missing"),))
    with pytest.raises(TypeError, match="list of paths"):
        IsolationPolicy(extra_readonly_paths="/usr")
    with pytest.raises(ConfigError, match="extra_readonly_paths: 'data' must be an absolute path"):
        SandboxConfig(extra_readonly_paths=["data"])
    with pytest.raises(ConfigError, match="does not exist"):
        SandboxConfig(extra_readonly_paths=[str(tmp_path / "missing")])


def test_plan_follows_symlinks_and_binds_each_real_path_once(tmp_path):
    real = tmp_path / "real"
    (real / "lib" / "pkg").mkdir(parents=True)
    (real / "lib" / "pkg" / "mod.py").write_text("x = 1\n")
    (real / "bin").mkdir()
    (real / "bin" / "python3.11").write_text("")
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python3").symlink_to(real / "bin" / "python3.11")
    (tmp_path / "venv" / "bin" / "python").symlink_to("python3")  # relative, then absolute
    (tmp_path / "alias").symlink_to("real/lib")
    binds, links = rootfs.resolve(
        [
            str(tmp_path / "venv" / "bin" / "python"),
            str(tmp_path / "alias" / "pkg" / "mod.py"),
            str(real / "lib"),
            str(tmp_path / "nothing-here"),
        ]
    )
    assert binds == sorted([str(real / "bin" / "python3.11"), str(real / "lib")])
    assert links == [
        [str(tmp_path / "alias"), "real/lib"],
        [str(tmp_path / "venv" / "bin" / "python"), "python3"],
        [str(tmp_path / "venv" / "bin" / "python3"), str(real / "bin" / "python3.11")],
    ]


def test_package_directories_inside_a_shown_one_are_emptied_but_for_the_wanted(tmp_path):
    lib = tmp_path / "usr" / "lib"
    site = lib / "python3.11" / "site-packages"
    for name in ("numpy", "torch", "secret_pkg"):
        (site / name).mkdir(parents=True)
    (lib / "python3.11" / "os.py").write_text("")
    binds, masks, inner = rootfs.mask_package_directories([str(lib)], [str(site / "numpy")])
    assert binds == [str(lib)] and masks == [str(site)] and inner == [str(site / "numpy")]


def test_plan_takes_nothing_from_sys_path(tmp_path):
    """Planned in a fresh interpreter (as the zygote plans it, with only what it imported
    mapped) that runs from a project folder on sys.path: nothing of the folder is shown, and
    of the virtual environment only its pyvenv.cfg (no package was preloaded)."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "train.jsonl").write_text("{}\n")
    script = (
        "import json, os, sys\n"
        "sys.path.insert(0, os.getcwd())\n"
        "from cir.sandbox import rootfs\n"
        "print(json.dumps(rootfs.plan_root(['math', 'json'], (), slots=2, work_root='/tmp/cir-work', new_proc=True)))"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=project, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    shown = plan["binds"] + plan["inner_binds"]
    assert not any(p.startswith(str(tmp_path)) for p in shown)
    in_prefix = [p for p in shown if p.startswith(sys.prefix + "/")]
    assert in_prefix == ([os.path.join(sys.prefix, "pyvenv.cfg")] if sys.prefix != sys.base_prefix else [])
    assert not any(p.endswith(("site-packages", "dist-packages")) for p in plan["binds"])
    assert os.path.realpath(sys.executable) in shown or any(
        os.path.realpath(sys.executable).startswith(p + "/") for p in shown
    )
    assert plan["devices"] and plan["slots"] == 2


def test_extra_readonly_paths_are_shown_read_only_and_listed(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "table.csv").write_text("a,b\n1,2\n")
    hidden = tmp_path / "hidden.txt"
    hidden.write_text("no\n")
    for p in (shared, shared / "table.csv", hidden):
        p.chmod(0o755 if p.is_dir() else 0o644)
    # (pytest's temporary root is private to its owner: in the snippet's root the directories
    # on the way to a shown path are made anew, traversable.)
    with Sandbox(workers=1, preload=("math",), warmup=False, extra_readonly_paths=[str(shared)]) as sb:
        assert str(shared) in sb.isolation_facts["filesystem"]["visible"]
        assert str(shared) in sb.isolation
        r = sb.run(f"print(open({str(shared / 'table.csv')!r}).read(), end='')")
        assert (r.status, r.stdout) == ("ok", "a,b\n1,2\n"), r
        write = sb.run(f"open({str(shared / 'new.txt')!r}, 'w')")
        assert write.status == "error" and "Read-only file system" in write.error_line
        assert sb.run(f"open({str(hidden)!r})").error_line.startswith("FileNotFoundError")
