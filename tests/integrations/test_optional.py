"""The integrations are optional extras: the core never imports a framework, and a missing one says what to install."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "diffusers")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_gradkit_imports_no_framework():
    code = (
        "import sys, importlib, gradkit\n"
        "for m in ('sources', 'transforms', 'optim', 'control', 'search', 'distributed', 'logging', 'guide'):\n"
        "    try:\n"
        "        importlib.import_module('gradkit.' + m)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        assert exc.name == 'gradkit.' + m, exc  # a package not written yet\n"
        f"print(sorted(k for k in sys.modules if k.split('.')[0] in {FRAMEWORKS!r}))\n"
    )
    out = run(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_a_missing_framework_names_the_extra_to_install():
    code = (
        "import sys\n"
        "for name in ('lightning', 'lightning.pytorch', 'transformers'):\n"
        "    sys.modules[name] = None  # as if not installed\n"
        "for module in ('lightning', 'transformers'):\n"
        "    try:\n"
        "        __import__('gradkit.integrations.' + module)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        print(exc)\n"
    )
    out = run(code)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and "gradkit[lightning]" in lines[0] and "gradkit[transformers]" in lines[1], lines
