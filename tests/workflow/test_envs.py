"""Every scripted rule names a conda environment, and that environment holds what the rule's script imports."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
#: conda-forge package -> the module it provides (the packages our environments list)
MODULES = {"pytorch": "torch", "faiss-cpu": "faiss", "numpy": "numpy", "scipy": "scipy", "nibabel": "nibabel",
           "simpleitk": "SimpleITK", "scikit-image": "skimage", "pandas": "pandas", "pyyaml": "yaml", "tqdm": "tqdm",
           "matplotlib-base": "matplotlib", "antspyx": "ants", "torchmetrics": "torchmetrics"}


def _rules():
    rules = []
    for smk in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=rule )", smk.read_text()):
            name = re.match(r"rule (\w+):", block)
            script = re.search(r'\n    script:\n        "([^"]+)"', block)
            if name and script:
                conda = re.search(r'\n    conda:\n        "([^"]+)"', block)
                rules.append((name.group(1), (smk.parent / script.group(1)).resolve(),
                              (smk.parent / conda.group(1)).resolve() if conda else None))
    return rules


def _env_modules(env: Path) -> set[str]:
    deps = yaml.safe_load(env.read_text())["dependencies"]
    deps += [p for d in deps if isinstance(d, dict) for p in d.get("pip", [])]  # PyPI packages of the environment
    names = {re.split(r"[=<> ]", d)[0] for d in deps if isinstance(d, str)}
    unknown = names - set(MODULES) - {"python", "pip"}
    assert not unknown, f"{env.name}: add {unknown} to MODULES"
    return {MODULES[n] for n in names if n in MODULES}


_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not in the rule's conda environment")
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize("rule,script,env", _rules(), ids=[r[0] for r in _rules()])
def test_the_rules_environment_provides_what_its_script_imports(rule, script, env):
    assert env is not None and env.is_file(), f"rule {rule} has no conda environment file"
    blocked = set(MODULES.values()) - _env_modules(env)
    tree = ast.parse(script.read_text())
    imports = "\n".join(ast.unparse(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom)))
    code = f"BLOCKED = {sorted(blocked)!r}\n{_BLOCK}\n{imports}\n"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, f"rule {rule} ({env.name}): {res.stderr.strip().splitlines()[-1]}"
