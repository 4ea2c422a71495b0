"""Fidelity: for varied snippets the sandbox gives what `python -c` gives in a fresh
interpreter under the same limits (status, exit code, stdout, the error line)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from test_sandbox_support import assert_clean

from cir.sandbox import Sandbox, run_fresh

TIMEOUT_S = 20.0  # generous: a fresh interpreter pays for `import sympy` inside it

SNIPPETS: list[tuple[str, float]] = [
    ("print(1)", TIMEOUT_S),
    ("print('héllo ✓ 数学 🙂')", TIMEOUT_S),
    ("for i in range(5):\n    print(i, i ** 2, sep=', ')", TIMEOUT_S),
    ("print(sum(range(10**6)))", TIMEOUT_S),
    ("print(repr(1 / 3), 2 ** 100, round(2.675, 2), f'{3.14159:.3f}')", TIMEOUT_S),
    ("1 / 0", TIMEOUT_S),
    ("raise ValueError('bad value')", TIMEOUT_S),
    ("def f():\n    return g()\ndef g():\n    raise KeyError('k')\nprint('start')\nf()", TIMEOUT_S),
    ("try:\n    1 / 0\nexcept Exception as e:\n    raise ValueError('wrapped') from e", TIMEOUT_S),
    ("x = [1, 2, 3]\nprint(x[5])", TIMEOUT_S),
    ("print(undefined_name)", TIMEOUT_S),
    ("print('x'", TIMEOUT_S),
    ("if True:\nprint(1)", TIMEOUT_S),
    ("def f(n):\n    return f(n + 1)\nf(0)", TIMEOUT_S),
    ("import sys\nprint('out')\nsys.exit(3)", TIMEOUT_S),
    ("import sys\nsys.exit('fatal: bad input')", TIMEOUT_S),
    ("import sys\nprint('bye')\nsys.exit(0)", TIMEOUT_S),
    ("exit(5)", TIMEOUT_S),
    ("raise SystemExit(None)", TIMEOUT_S),
    ("import os\nprint('lost')\nos._exit(0)", TIMEOUT_S),
    ("import sys\nsys.stdout.write('no newline')", TIMEOUT_S),
    ("import sys\nprint('warn', file=sys.stderr)\nprint('ok')", TIMEOUT_S),
    ("import warnings\nwarnings.warn('careful')\nprint('after')", TIMEOUT_S),
    ("raise KeyboardInterrupt", TIMEOUT_S),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)", TIMEOUT_S),
    ("print(__name__)\nimport sys\nprint(sys.argv)", TIMEOUT_S),
    ("import math\nprint(math.factorial(30), math.isqrt(10**20), math.comb(50, 25))", TIMEOUT_S),
    ("from fractions import Fraction\nprint(Fraction(3, 4) + Fraction(1, 6))", TIMEOUT_S),
    ("from decimal import Decimal, getcontext\ngetcontext().prec = 40\nprint(Decimal(1) / Decimal(7))", TIMEOUT_S),
    ("import itertools\nprint(sum(1 for p in itertools.permutations(range(7)) if p[0] < p[-1]))", TIMEOUT_S),
    (
        "import sympy as sp\nx = sp.symbols('x')\nprint(sp.factor(x**4 - 1))\nprint(sp.solve(x**2 - 2, x))\n"
        "print(sp.summation(1 / sp.Symbol('k')**2, (sp.Symbol('k'), 1, sp.oo)))",
        TIMEOUT_S,
    ),
    ("import sympy\nprint(sympy.factorint(2**32 + 1), sympy.isprime(97), sympy.Rational(7, 3) ** 3)", TIMEOUT_S),
    ("import sympy\nsympy.solve(1 / 0)", TIMEOUT_S),
    (
        "import numpy as np\nprint(np.arange(12).reshape(3, 4).sum(axis=0))\nprint(np.linalg.inv([[1.0, 2.0], [3.0, 4.0]]))",
        TIMEOUT_S,
    ),
    ("import numpy as np\nnp.random.seed(0)\nprint(np.random.randint(0, 100, 5))", TIMEOUT_S),
    ("import numpy as np\nnp.linalg.inv(np.zeros((2, 2)))", TIMEOUT_S),
    ("print('\\n'.join(str(i * i) for i in range(5000)))", TIMEOUT_S),
    ("print('a' * 70000)", TIMEOUT_S),
    ("open('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())", TIMEOUT_S),
    ("while True:\n    pass", 1.0),
    ("input()", 1.0),
    ("import time\nprint('started', flush=True)\ntime.sleep(30)", 1.0),
]


@pytest.fixture(scope="module")
def sb():
    with Sandbox(workers=2, timeout_s=TIMEOUT_S) as sandbox:
        yield sandbox


def test_same_as_fresh_interpreter(sb):
    codes = [code for code, _ in SNIPPETS]
    ours = [sb.run(code, timeout_s=timeout) for code, timeout in SNIPPETS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        fresh = list(
            pool.map(lambda item: run_fresh(item[0], timeout_s=item[1], max_output_bytes=sb.max_output_bytes), SNIPPETS)
        )
    mismatches = []
    for code, a, b in zip(codes, ours, fresh):
        mine = (a.status, a.exit_code, a.stdout, a.error_line)
        truth = (b.status, b.exit_code, b.stdout, b.error_line)
        if mine != truth:
            short = lambda t: tuple(v[:200] + "..." if isinstance(v, str) and len(v) > 200 else v for v in t)  # noqa: E731
            mismatches.append(f"{code[:80]!r}:\n  sandbox {short(mine)}\n  fresh   {short(truth)}")
    assert not mismatches, "\n".join(mismatches)
    # The comparison is not vacuous: every status except "memory" occurs.
    assert {r.status for r in fresh} >= {"ok", "error", "timeout", "killed", "output_limit"}
    assert_clean(sb)
