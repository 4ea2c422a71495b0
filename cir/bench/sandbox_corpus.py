"""The snippet corpus of ``cir bench sandbox``: Python as a model solving competition math writes it.

Every snippet comes from a template (a small function of a seeded ``random.Random``) so the
corpus is large, varied and yet identical on every machine and every run: the seeds are strings
(hashed with SHA-512 by ``random``), nothing depends on ``PYTHONHASHSEED``, and the templates only
print values whose text is deterministic (no sets of strings, no clocks, no unseeded randomness,
floats rounded where a BLAS could change the last digit).

Each :class:`Snippet` carries a fine ``category`` (``sympy_solve``, ``error_name``,
``infinite_loop``, ...) and the status its template is written to produce (``expect``): ``ok``,
``error``, ``timeout``, ``output_limit`` or ``memory``. The benchmark never trusts ``expect`` for
scoring (the fresh-interpreter ground truth decides); it is there so a corpus bug shows up as a
disagreement between what a template meant and what Python did.

The mix: about 80% computations (sympy solve/simplify/factor/calculus/summation/number theory,
brute-force loops, itertools, fractions, math, numpy, strings, dynamic programming), about 15%
snippets that raise (NameError, ZeroDivisionError, TypeError, IndexError, SyntaxError, sympy
errors, ...), a few infinite loops and reads of an empty stdin (both end as timeouts), a few
prints of 100k+ characters and a few memory bombs.
Most snippets need a few milliseconds in a warm interpreter.
"""

from __future__ import annotations

import random
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

EXPECTED_STATUSES = ("ok", "error", "timeout", "output_limit", "memory")
# Large-print templates write at least this many characters; the benchmark's default output cap
# is below it, so they end as ``output_limit``.
LARGE_PRINT_CHARS = 100_000
CORPUS_SEED = "cir-bench-sandbox-v1"


@dataclass(frozen=True)
class Snippet:
    """One corpus item: ``id`` is ``<category>-<index>`` and unique."""

    id: str
    category: str
    code: str
    expect: str

    @property
    def is_infinite(self) -> bool:
        """Written to run past any timeout: an infinite loop or a read of stdin, which never gets
        data (left out of the 'without infinite loops' runs)."""
        return self.expect == "timeout"


def _c(text: str) -> str:
    return textwrap.dedent(text).strip("\n") + "\n"


def _lin(coef: int, var: str) -> str:
    """`coef*var` with its sign, for building polynomial source: ' - 3*x', ' + x'."""
    sign = "-" if coef < 0 else "+"
    mag = abs(coef)
    body = var if mag == 1 and var else (f"{mag}*{var}" if var else str(mag))
    return f" {sign} {body}"


def _poly_src(coeffs: list[int], var: str = "x") -> str:
    """Source text of sum(c_i * var**i) with the highest degree first, e.g. 'x**2 - 5*x + 6'."""
    deg = len(coeffs) - 1
    parts: list[str] = []
    for power in range(deg, -1, -1):
        c = coeffs[power]
        if c == 0:
            continue
        term = var if power == 1 else (f"{var}**{power}" if power > 1 else "")
        parts.append(_lin(c, term))
    text = "".join(parts).strip()
    if text.startswith("+ "):
        text = text[2:]
    elif text.startswith("- "):
        text = "-" + text[2:]
    return text or "0"


def _expand_roots(roots: list[int], lead: int = 1) -> list[int]:
    """Coefficients (lowest degree first) of lead * prod(x - r)."""
    coeffs = [lead]
    for r in roots:
        nxt = [0] * (len(coeffs) + 1)
        for i, c in enumerate(coeffs):
            nxt[i + 1] += c
            nxt[i] -= r * c
        coeffs = nxt
    return coeffs


def _nonzero(rng: random.Random, lo: int, hi: int) -> int:
    while True:
        v = rng.randint(lo, hi)
        if v != 0:
            return v


# ---------------------------------------------------------------------------------------------
# sympy
# ---------------------------------------------------------------------------------------------


def sympy_solve(rng: random.Random) -> str:
    kind = rng.choices(range(4), weights=[3, 2, 2, 1])[0]
    if kind == 0:
        r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
        poly = _poly_src(_expand_roots([r1, r2]))
        return _c(f"""
            from sympy import symbols, solve
            x = symbols('x')
            roots = solve({poly}, x)
            print(roots)
            print("sum of roots:", sum(roots))
        """)
    if kind == 1:
        while True:
            a, b, d, e = (_nonzero(rng, -6, 6) for _ in range(4))
            if a * e - b * d != 0:
                break
        x0, y0 = rng.randint(-5, 5), rng.randint(-5, 5)
        c, f = a * x0 + b * y0, d * x0 + e * y0
        return _c(f"""
            from sympy import symbols, Eq, solve
            x, y = symbols('x y')
            sol = solve([Eq({a}*x + {b}*y, {c}), Eq({d}*x + {e}*y, {f})], [x, y])
            print(sol[x], sol[y])
            print(sol[x] + sol[y])
        """)
    if kind == 2:
        roots = [rng.randint(-4, 4) for _ in range(3)]
        poly = _poly_src(_expand_roots(roots, lead=rng.choice([1, 2])))
        return _c(f"""
            import sympy as sp
            x = sp.symbols('x')
            p = {poly}
            rs = sp.roots(sp.Poly(p, x))
            print(sorted(rs.items()))
        """)
    a, b = rng.randint(2, 9), rng.randint(-5, 5)
    return _c(f"""
        from sympy import symbols, solve, discriminant
        x, k = symbols('x k')
        # the line y = k*x + ({b}) touches y = x**2 + {a} when the discriminant vanishes
        expr = x**2 + {a} - (k*x + ({b}))
        ks = solve(discriminant(expr, x), k)
        print(ks)
    """)


def sympy_simplify(rng: random.Random) -> str:
    kind = rng.choices(range(6), weights=[3, 1, 1, 1, 3, 1])[0]
    if kind == 0:
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(-9, 9)
        return _c(f"""
            from sympy import symbols, factor, expand
            x = symbols('x')
            p = expand((x + {a})*(x - {b})*(x + ({c})))
            print(p)
            print(factor(p))
        """)
    if kind == 1:
        a = rng.randint(1, 12)
        return _c(f"""
            import sympy as sp
            x = sp.symbols('x')
            expr = (x**2 - {a * a})/(x - {a}) + (x**3 - {a**3})/(x**2 + {a}*x + {a * a})
            print(sp.simplify(expr))
        """)
    if kind == 2:
        n = rng.randint(2, 5)
        return _c(f"""
            from sympy import symbols, sin, cos, expand_trig
            x = symbols('x')
            print(expand_trig(sin({n}*x)))
            print(expand_trig(cos({n}*x)))
        """)
    if kind == 3:
        a, b = rng.sample(range(-6, 7), 2)
        return _c(f"""
            from sympy import symbols, apart, together
            x = symbols('x')
            f = 1/((x + ({a}))*(x + ({b})))
            print(apart(f, x))
            print(together(apart(f, x)))
        """)
    if kind == 4:
        n, k = rng.randint(4, 9), None
        k = rng.randint(1, n - 1)
        a, b = rng.randint(1, 3), rng.randint(1, 4)
        return _c(f"""
            from sympy import symbols, expand
            x = symbols('x')
            p = expand(({a}*x + {b})**{n})
            print(p.coeff(x, {k}))
            print(p.subs(x, 1))
        """)
    a, b = rng.randint(1, 5), rng.randint(1, 5)
    return _c(f"""
        from sympy import symbols, cancel, factor
        x, y = symbols('x y')
        expr = (x**2 - {b * b}*y**2)/(x**2 + {2 * b}*x*y + {b * b}*y**2) * (x + {b}*y)
        print(cancel(expr))
        print(factor(x**4 - {a**4}))
    """)


def sympy_calculus(rng: random.Random) -> str:
    kind = rng.choices(range(4), weights=[3, 2, 2, 3])[0]
    if kind == 0:
        n, x0 = rng.randint(1, 4), rng.randint(0, 2)
        return _c(f"""
            from sympy import symbols, diff, exp
            x = symbols('x')
            f = x**{n} * exp({x0}*x)
            d = diff(f, x)
            print(d)
            print(d.subs(x, 1))
        """)
    if kind == 1:
        a, b, c, u = rng.randint(1, 6), rng.randint(-5, 5), rng.randint(-5, 5), rng.randint(1, 5)
        return _c(f"""
            from sympy import symbols, integrate
            x = symbols('x')
            area = integrate({a}*x**2 + ({b})*x + ({c}), (x, 0, {u}))
            print(area)
        """)
    if kind == 2:
        a = rng.randint(1, 9)
        which = rng.randrange(3)
        expr = [f"sin({a}*x)/x", f"(1 - cos({a}*x))/x**2", f"(exp({a}*x) - 1)/x"][which]
        return _c(f"""
            from sympy import symbols, limit, sin, cos, exp
            x = symbols('x')
            print(limit({expr}, x, 0))
        """)
    a, b = rng.randint(1, 4), rng.randint(1, 6)
    return _c(f"""
        from sympy import symbols, diff, solve
        x = symbols('x')
        f = x**3 - {3 * a * a}*x + {b}
        crit = solve(diff(f, x), x)
        print(crit)
        print([f.subs(x, c) for c in crit])
    """)


def sympy_sum(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        p, N = rng.randint(1, 3), rng.randint(10, 100)
        return _c(f"""
            from sympy import symbols, summation, factor
            k, n = symbols('k n', integer=True, positive=True)
            s = summation(k**{p}, (k, 1, n))
            print(factor(s))
            print(s.subs(n, {N}))
        """)
    if kind == 1:
        N = rng.randint(10, 200)
        return _c(f"""
            from sympy import Rational
            total = sum(Rational(1, k*(k + 1)) for k in range(1, {N} + 1))
            print(total)
        """)
    if kind == 2:
        num, den, N = rng.randint(1, 4), rng.randint(5, 9), rng.randint(5, 20)
        return _c(f"""
            from sympy import Rational, summation, symbols
            k = symbols('k', integer=True)
            print(summation(Rational({num}, {den})**k, (k, 0, {N})))
        """)
    N = rng.randint(5, 30)
    return _c(f"""
        from sympy import Rational, prod
        value = prod([1 + Rational(1, k) for k in range(1, {N} + 1)])
        print(value)
    """)


def sympy_numbertheory(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        n = rng.choice([2, 3, 5, 7, 11, 13]) ** rng.randint(1, 5) * rng.randint(2, 5000)
        return _c(f"""
            from sympy import factorint
            print(factorint({n}))
        """)
    if kind == 1:
        n = rng.randint(100, 100000)
        return _c(f"""
            from sympy import divisors, divisor_count, divisor_sigma
            n = {n}
            print(len(divisors(n)), divisor_count(n), divisor_sigma(n))
        """)
    if kind == 2:
        lo = rng.randint(1, 5000)
        hi = lo + rng.randint(100, 3000)
        return _c(f"""
            from sympy import primerange, isprime, nextprime
            ps = list(primerange({lo}, {hi}))
            print(len(ps), sum(ps))
            print(isprime({hi}), nextprime({hi}))
        """)
    if kind == 3:
        m = rng.choice([97, 101, 1009, 10007, 998244353])
        a = rng.randint(2, m - 1)
        return _c(f"""
            from sympy import mod_inverse, totient
            inv = mod_inverse({a}, {m})
            print(inv, ({a} * inv) % {m})
            print(totient({rng.randint(100, 10**6)}))
        """)
    m1, m2 = rng.choice([(3, 5), (4, 7), (5, 9), (7, 11), (8, 9)])
    r1, r2 = rng.randrange(m1), rng.randrange(m2)
    return _c(f"""
        from sympy.ntheory.modular import crt
        print(crt([{m1}, {m2}], [{r1}, {r2}]))
    """)


def sympy_rational(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        a, b, c, d = rng.randint(1, 20), rng.randint(2, 30), rng.randint(1, 20), rng.randint(2, 30)
        return _c(f"""
            from sympy import Rational
            r = Rational({a}, {b}) + Rational({c}, {d})
            print(r, r.p, r.q)
            print(r**2)
        """)
    if kind == 1:
        n = rng.choice([8, 12, 18, 20, 27, 32, 45, 48, 50, 72, 75, 98, 108, 200])
        return _c(f"""
            from sympy import sqrt, simplify
            print(sqrt({n}))
            print(simplify(sqrt({n}) * sqrt({n * 2})))
        """)
    if kind == 2:
        a, b = rng.sample([2, 3, 5, 6, 7, 10, 11], 2)
        return _c(f"""
            from sympy import sqrt, radsimp
            print(radsimp(1/(sqrt({a}) + sqrt({b}))))
        """)
    num, den = rng.randint(1, 31), rng.choice([2, 4, 8, 16, 32, 5, 25])
    return _c(f"""
        from sympy import nsimplify
        print(nsimplify({num / den!r}))
    """)


def sympy_matrix(rng: random.Random) -> str:
    while True:
        m = [[rng.randint(-5, 5) for _ in range(3)] for _ in range(3)]
        det = (
            m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
        )
        if det != 0:
            break
    if rng.randrange(2):
        return _c(f"""
            from sympy import Matrix
            M = Matrix({m})
            print(M.det())
            print(M.inv())
        """)
    a, b = rng.randint(1, 6), rng.randint(1, 6)
    return _c(f"""
        from sympy import Matrix
        M = Matrix([[{a}, {b}], [{b}, {a}]])
        print(sorted(M.eigenvals().items()))
        print(M**3)
    """)


# ---------------------------------------------------------------------------------------------
# plain Python: brute force, itertools, fractions, math
# ---------------------------------------------------------------------------------------------


def bruteforce(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        c = rng.randint(200, 2000)
        return _c(f"""
            count = 0
            for x in range(1, {c} + 1):
                for y in range(1, ({c} - {a}*x) // {b} + 1):
                    if {a}*x + {b}*y == {c}:
                        count += 1
            print(count)
        """)
    if kind == 1:
        m, r = rng.choice([(1000, 1), (1000, 9), (100, 21), (1000, 489), (10000, 1)]), None
        m, r = m
        return _c(f"""
            n = 1
            while n * n % {m} != {r}:
                n += 1
            print(n)
        """)
    if kind == 2:
        N, k = rng.randint(2000, 6000), rng.randint(3, 9)
        return _c(f"""
            def digit_sum(n):
                return sum(int(d) for d in str(n))

            print(sum(1 for n in range(1, {N} + 1) if digit_sum(n) % {k} == 0))
        """)
    if kind == 3:
        L = rng.randint(40, 90)
        return _c(f"""
            triples = []
            for a in range(1, {L}):
                for b in range(a, {L}):
                    c2 = a*a + b*b
                    c = int(c2 ** 0.5)
                    if c <= {L} and c * c == c2:
                        triples.append((a, b, c))
            print(len(triples))
            print(triples[:5])
        """)
    if kind == 4:
        N = rng.randint(1000, 10000)
        a, b, c = rng.sample([2, 3, 5, 7, 11, 13], 3)
        return _c(f"""
            count = 0
            for n in range(1, {N} + 1):
                if (n % {a} == 0 or n % {b} == 0) and n % {c} != 0:
                    count += 1
            print(count)
        """)
    N = rng.randint(1000, 5000)
    return _c(f"""
        total = 0
        for n in range(1, {N}):
            if all(d in '13579' for d in str(n)):
                total += n
        print(total)
    """)


def itertools_combinatorics(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        n, k = rng.randint(5, 7), rng.randint(2, 5)
        return _c(f"""
            from itertools import permutations
            count = 0
            for p in permutations(range(1, {n} + 1)):
                if all(abs(p[i] - p[i + 1]) != 1 for i in range({n} - 1)) and p[0] % {k} != 0:
                    count += 1
            print(count)
        """)
    if kind == 1:
        n, k = rng.randint(10, 16), rng.randint(3, 4)
        s = rng.randint(k * (k + 1) // 2 + 3, k * n - 5)
        return _c(f"""
            import itertools
            combos = [c for c in itertools.combinations(range(1, {n} + 1), {k}) if sum(c) == {s}]
            print(len(combos))
            print(combos[:3])
        """)
    if kind == 2:
        dice, target = rng.randint(2, 4), None
        target = rng.randint(dice, 6 * dice)
        return _c(f"""
            from itertools import product
            from fractions import Fraction
            outcomes = list(product(range(1, 7), repeat={dice}))
            favorable = sum(1 for o in outcomes if sum(o) == {target})
            print(favorable, len(outcomes), Fraction(favorable, len(outcomes)))
        """)
    if kind == 3:
        amount = rng.randint(15, 40)
        coins = sorted(rng.sample([1, 2, 5, 10, 20, 25], 3))
        return _c(f"""
            from itertools import combinations_with_replacement
            coins = {coins}
            ways = 0
            for n in range(1, {amount} // {coins[0]} + 1):
                for combo in combinations_with_replacement(coins, n):
                    if sum(combo) == {amount}:
                        ways += 1
            print(ways)
        """)
    n = rng.randint(5, 7)
    return _c(f"""
        from itertools import permutations
        derangements = sum(1 for p in permutations(range({n})) if all(p[i] != i for i in range({n})))
        print(derangements)
    """)


def fractions_exact(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.randint(5, 40)
        return _c(f"""
            from fractions import Fraction
            H = sum(Fraction(1, k) for k in range(1, {n} + 1))
            print(H)
            print(H.numerator % 1000, H.denominator % 1000)
        """)
    if kind == 1:
        terms = [rng.randint(0, 3)] + [rng.randint(1, 9) for _ in range(rng.randint(3, 8))]
        return _c(f"""
            from fractions import Fraction
            cf = {terms}
            value = Fraction(cf[-1])
            for a in reversed(cf[:-1]):
                value = a + 1 / value
            print(value, float(value))
        """)
    if kind == 2:
        num, den = rng.randint(2, 11), rng.randint(12, 97)
        return _c(f"""
            from fractions import Fraction
            import math
            r = Fraction({num}, {den})
            parts = []
            while r > 0:
                d = math.ceil(1 / r)
                parts.append(d)
                r -= Fraction(1, d)
            print(parts)
        """)
    a, b, n = rng.randint(1, 5), rng.randint(6, 12), rng.randint(3, 8)
    return _c(f"""
        from fractions import Fraction
        p = Fraction({a}, {b})
        # probability that the first success happens on an odd-numbered trial, first {n} terms
        s = sum((1 - p) ** (2 * k) * p for k in range({n}))
        print(s, round(float(s), 6))
    """)


def math_functions(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        nums = [rng.randint(2, 500) * rng.choice([1, 6, 12]) for _ in range(rng.randint(3, 6))]
        return _c(f"""
            import math
            from functools import reduce
            nums = {nums}
            g = reduce(math.gcd, nums)
            l = reduce(lambda a, b: a * b // math.gcd(a, b), nums)
            print(g, l)
        """)
    if kind == 1:
        n, k = rng.randint(10, 60), rng.randint(2, 9)
        return _c(f"""
            from math import comb, perm, factorial
            print(comb({n}, {k}), perm({n}, {k}) // factorial({k}) == comb({n}, {k}))
            print(sum(comb({n}, i) for i in range(0, {n} + 1, 2)))
        """)
    if kind == 2:
        n = rng.randint(100, 2000)
        return _c(f"""
            import math
            n = {n}
            zeros, p = 0, 5
            while p <= n:
                zeros += n // p
                p *= 5
            print(zeros)
            print(sum(int(d) for d in str(math.factorial({min(n, 500)}))))
        """)
    if kind == 3:
        a, b, m = rng.randint(2, 99), rng.randint(10**5, 10**9), rng.choice([10**9 + 7, 1000, 97, 2**31 - 1])
        return _c(f"""
            print(pow({a}, {b}, {m}))
            print(pow({a}, -1, {m}) if {m} % {a} != 0 and {m} != 1000 else 'no inverse')
        """)
    n = rng.randint(10**6, 10**12)
    return _c(f"""
        import math
        n = {n}
        r = math.isqrt(n)
        print(r, r * r == n, (r + 1) ** 2 - n)
    """)


# ---------------------------------------------------------------------------------------------
# numpy, strings, dynamic programming, recursion, geometry, probability, sequences
# ---------------------------------------------------------------------------------------------


def numpy_work(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        n = rng.randint(3, 5)
        m = [[rng.randint(-6, 6) for _ in range(n)] for _ in range(n)]
        return _c(f"""
            import numpy as np
            A = np.array({m})
            print(round(np.linalg.det(A)))
            print(A.T @ A)
        """)
    if kind == 1:
        while True:
            m = [[rng.randint(-5, 5) for _ in range(3)] for _ in range(3)]
            d = (
                m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
                - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
            )
            if abs(d) >= 3:
                break
        b = [rng.randint(-10, 10) for _ in range(3)]
        return _c(f"""
            import numpy as np
            A = np.array({m}, dtype=float)
            b = np.array({b}, dtype=float)
            x = np.linalg.solve(A, b)
            print(np.round(x, 6))
            print(np.allclose(A @ x, b))
        """)
    if kind == 2:
        a, b, c = rng.randint(1, 5), rng.randint(-3, 3), rng.randint(1, 5)
        return _c(f"""
            import numpy as np
            S = np.array([[{a + 3}, {b}, 0], [{b}, {c + 3}, 1], [0, 1, {a + c}]], dtype=float)
            w = np.linalg.eigvalsh(S)
            print(np.round(w, 6))
            print(round(float(np.prod(w)), 6), round(float(np.linalg.det(S)), 6))
        """)
    if kind == 3:
        N, a, b = rng.randint(10**4, 2 * 10**5), rng.randint(2, 9), rng.randint(10, 30)
        return _c(f"""
            import numpy as np
            n = np.arange(1, {N} + 1)
            mask = (n % {a} == 0) | (n % {b} == 0)
            print(int(mask.sum()), int(n[mask].sum()))
        """)
    if kind == 4:
        roots = rng.sample(range(-6, 7), 3)
        coeffs = list(reversed(_expand_roots(roots)))
        return _c(f"""
            import numpy as np
            r = np.roots({coeffs})
            print(np.round(np.sort(r.real), 6) + 0.0)
        """)
    n, mod = rng.randint(10, 80), rng.choice([1000, 10007, 65536])
    return _c(f"""
        import numpy as np

        def mat_pow(M, e, mod):
            R = np.eye(2, dtype=np.int64)
            while e:
                if e & 1:
                    R = (R @ M) % mod
                M = (M @ M) % mod
                e >>= 1
            return R

        F = mat_pow(np.array([[1, 1], [1, 0]], dtype=np.int64), {n}, {mod})
        print(F[0, 1])
    """)


_WORDS = [
    "MISSISSIPPI",
    "BANANA",
    "COMBINATORICS",
    "ALGEBRA",
    "PARALLEL",
    "GEOMETRY",
    "SUCCESS",
    "BOOKKEEPER",
    "COMMITTEE",
    "ADDRESS",
    "STATISTICS",
    "INTEGER",
]


def strings(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        lo = rng.randint(10, 5000)
        hi = lo + rng.randint(1000, 20000)
        return _c(f"""
            pal = [n for n in range({lo}, {hi}) if str(n) == str(n)[::-1]]
            print(len(pal), pal[:5])
        """)
    if kind == 1:
        word = rng.choice(_WORDS)
        return _c(f"""
            from collections import Counter
            from math import factorial
            word = "{word}"
            counts = Counter(word)
            arrangements = factorial(len(word))
            for c in counts.values():
                arrangements //= factorial(c)
            print(sorted(counts.items()))
            print(arrangements)
        """)
    if kind == 2:
        n, base = rng.randint(10**5, 10**9), rng.choice([2, 3, 5, 7, 8, 16])
        return _c(f"""
            def to_base(n, b):
                digits = []
                while n:
                    digits.append("0123456789abcdef"[n % b])
                    n //= b
                return "".join(reversed(digits)) or "0"

            s = to_base({n}, {base})
            print(s, len(s), int(s, {base}) == {n})
        """)
    if kind == 3:
        e = rng.randint(50, 1000)
        return _c(f"""
            s = str(2 ** {e})
            print(len(s), sum(map(int, s)), s[:10])
        """)
    shift = rng.randint(1, 25)
    phrase = rng.choice(
        ["THE QUICK BROWN FOX", "FIND THE REMAINDER", "SUM OF ALL PRIMES", "HOW MANY INTEGERS", "COUNT THE SQUARES"]
    )
    return _c(f"""
        text = "{phrase}"
        enc = "".join(chr((ord(ch) - 65 + {shift}) % 26 + 65) if ch.isalpha() else ch for ch in text)
        print(enc)
        print(sum(1 for ch in enc if ch in "AEIOU"))
    """)


def dynamic_programming(rng: random.Random) -> str:
    kind = rng.randrange(5)
    if kind == 0:
        n = rng.randint(20, 150)
        return _c(f"""
            n = {n}
            p = [1] + [0] * n
            for part in range(1, n + 1):
                for total in range(part, n + 1):
                    p[total] += p[total - part]
            print(p[n])
        """)
    if kind == 1:
        R, C = rng.randint(5, 12), rng.randint(5, 12)
        blocked = sorted({(rng.randrange(1, R), rng.randrange(1, C)) for _ in range(rng.randint(2, 6))})
        return _c(f"""
            R, C = {R}, {C}
            blocked = {blocked}
            ways = [[0] * (C + 1) for _ in range(R + 1)]
            ways[0][0] = 1
            for i in range(R + 1):
                for j in range(C + 1):
                    if (i, j) in blocked or (i, j) == (0, 0):
                        continue
                    ways[i][j] = (ways[i - 1][j] if i else 0) + (ways[i][j - 1] if j else 0)
            print(ways[R][C])
        """)
    if kind == 2:
        amount = rng.randint(50, 500)
        coins = sorted(rng.sample([1, 2, 3, 5, 7, 10, 20, 25, 50], 4))
        return _c(f"""
            coins = {coins}
            amount = {amount}
            dp = [1] + [0] * amount
            for c in coins:
                for v in range(c, amount + 1):
                    dp[v] += dp[v - c]
            print(dp[amount])
        """)
    if kind == 3:
        n = rng.randint(10, 60)
        return _c(f"""
            # binary strings of length {n} with no two adjacent ones
            end0, end1 = 1, 1
            for _ in range({n} - 1):
                end0, end1 = end0 + end1, end0
            print(end0 + end1)
        """)
    seq = [rng.randint(1, 100) for _ in range(rng.randint(30, 80))]
    return _c(f"""
        from bisect import bisect_left
        seq = {seq}
        tails = []
        for v in seq:
            i = bisect_left(tails, v)
            if i == len(tails):
                tails.append(v)
            else:
                tails[i] = v
        print(len(tails))
    """)


def recursion(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        n, mod = rng.randint(50, 300), rng.choice([10**9 + 7, 10**6, 997])
        return _c(f"""
            from functools import lru_cache

            @lru_cache(maxsize=None)
            def fib(n):
                return n if n < 2 else (fib(n - 1) + fib(n - 2)) % {mod}

            print(fib({n}))
        """)
    if kind == 1:
        n = rng.randint(5, 25)
        return _c(f"""
            from functools import lru_cache

            @lru_cache(maxsize=None)
            def catalan(n):
                if n <= 1:
                    return 1
                return sum(catalan(i) * catalan(n - 1 - i) for i in range(n))

            print([catalan(i) for i in range(6)], catalan({n}))
        """)
    if kind == 2:
        n = rng.randint(3, 16)
        return _c(f"""
            def hanoi(n, src, dst, via, moves):
                if n == 0:
                    return
                hanoi(n - 1, src, via, dst, moves)
                moves.append((src, dst))
                hanoi(n - 1, via, dst, src, moves)

            moves = []
            hanoi({n}, 'A', 'C', 'B', moves)
            print(len(moves), moves[:3])
        """)
    n = rng.randint(1, 300)
    return _c(f"""
        def depth_sum(n):
            return 0 if n == 0 else n + depth_sum(n - 1)

        print(depth_sum({n}), {n} * ({n} + 1) // 2)
    """)


def geometry(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        pts = [(rng.randint(-10, 10), rng.randint(-10, 10)) for _ in range(rng.randint(3, 6))]
        return _c(f"""
            from fractions import Fraction
            pts = {pts}
            area2 = 0
            for (x1, y1), (x2, y2) in zip(pts, pts[1:] + pts[:1]):
                area2 += x1 * y2 - x2 * y1
            print(Fraction(abs(area2), 2))
        """)
    if kind == 1:
        r = rng.randint(5, 40)
        return _c(f"""
            r = {r}
            inside = sum(1 for x in range(-r, r + 1) for y in range(-r, r + 1) if x*x + y*y <= r*r)
            print(inside)
        """)
    if kind == 2:
        P = rng.randint(12, 90)
        return _c(f"""
            P = {P}
            tris = [(a, b, P - a - b) for a in range(1, P) for b in range(a, P)
                    if b <= P - a - b and a + b > P - a - b]
            print(len(tris))
        """)
    a, b = (rng.randint(-8, 8), rng.randint(-8, 8)), (rng.randint(-8, 8), rng.randint(-8, 8))
    return _c(f"""
        from sympy import Point, sqrt
        A, B = Point{a}, Point{b}
        print(A.distance(B))
        print(A.midpoint(B))
    """)


def probability(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        n, k = rng.randint(5, 20), None
        k = rng.randint(1, n)
        return _c(f"""
            from math import comb
            from fractions import Fraction
            p = Fraction(sum(comb({n}, i) for i in range({k}, {n} + 1)), 2 ** {n})
            print(p)
        """)
    if kind == 1:
        hand = rng.randint(2, 5)
        return _c(f"""
            from math import comb
            from fractions import Fraction
            # probability that a {hand}-card hand has all cards of one suit
            p = Fraction(4 * comb(13, {hand}), comb(52, {hand}))
            print(p, float(p))
        """)
    sides = rng.choice([4, 6, 8, 10, 12, 20])
    return _c(f"""
        from fractions import Fraction
        from itertools import product
        faces = range(1, {sides} + 1)
        ev = Fraction(sum(max(a, b) for a, b in product(faces, repeat=2)), {sides} ** 2)
        print(ev)
    """)


def sequences(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        N = rng.randint(200, 800)
        return _c(f"""
            def collatz_len(n):
                steps = 0
                while n != 1:
                    n = n // 2 if n % 2 == 0 else 3 * n + 1
                    steps += 1
                return steps

            best = max(range(1, {N}), key=collatz_len)
            print(best, collatz_len(best))
        """)
    if kind == 1:
        a, b, m, N = rng.randint(1, 5), rng.randint(1, 5), rng.choice([1000, 997, 10**9 + 7]), rng.randint(100, 5000)
        return _c(f"""
            x, y = 0, 1
            for _ in range({N}):
                x, y = y, ({a} * y + {b} * x) % {m}
            print(x)
        """)
    m = rng.randint(2, 120)
    return _c(f"""
        def pisano(m):
            a, b = 0, 1
            for i in range(1, 6 * m + 1):
                a, b = b, (a + b) % m
                if (a, b) == (0, 1):
                    return i

        print(pisano({m}))
    """)


def unicode_output(rng: random.Random) -> str:
    n = rng.randint(2, 99)
    kind = rng.randrange(2)
    if kind == 0:
        return _c(f"""
            import math
            print(f"√{n} ≈ {{math.sqrt({n}):.6f}}")
            print("∑ k for k ≤ {n} =", {n} * ({n} + 1) // 2)
        """)
    return _c(f"""
        from sympy import symbols, pretty, Integral, sqrt
        x = symbols('x')
        print(pretty(Integral(sqrt(x + {n}), x), use_unicode=True))
    """)


def sys_exit_ok(rng: random.Random) -> str:
    n = rng.randint(10, 99)
    return _c(f"""
        import sys
        for k in range(2, {n}):
            if {n} % k == 0:
                print("smallest factor", k)
                sys.exit(0)
        print("{n} is prime")
    """)


def main_guard(rng: random.Random) -> str:
    n, m = rng.randint(10, 200), rng.randint(2, 9)
    return _c(f"""
        def solve(n, m):
            return sum(k for k in range(1, n + 1) if k % m == 0)


        def main():
            print(solve({n}, {m}))


        if __name__ == "__main__":
            main()
    """)


def medium_output(rng: random.Random) -> str:
    kind = rng.randrange(2)
    if kind == 0:
        n = rng.randint(1500, 4000)
        return _c(f"""
            for n in range(1, {n} + 1):
                print(n, n * n)
        """)
    limit = rng.randint(20000, 40000)
    return _c(f"""
        sieve = bytearray([1]) * {limit}
        sieve[0] = sieve[1] = 0
        for i in range(2, int({limit} ** 0.5) + 1):
            if sieve[i]:
                sieve[i * i::i] = bytearray(len(range(i * i, {limit}, i)))
        print([i for i in range({limit}) if sieve[i]])
    """)


# ---------------------------------------------------------------------------------------------
# snippets that raise
# ---------------------------------------------------------------------------------------------


def error_name(rng: random.Random) -> str:
    kind = rng.randrange(4)
    n = rng.randint(2, 500)
    if kind == 0:
        return _c(f"""
            x = {n}
            print(math.sqrt(x))
        """)
    if kind == 1:
        return _c(f"""
            total = 0
            for i in range(1, {n}):
                total += i
            print(totl)
        """)
    if kind == 2:
        return _c(f"""
            import numpy as np
            A = np.array([[{n}, 1], [2, 3]])
            print(np.linalg.det(A).round(3))
            print(sp.Matrix(A).det())
        """)
    return _c(f"""
        from sympy import symbols
        x = symbols('x')
        print(solve(x**2 - {n}, x))
    """)


def error_zero_division(rng: random.Random) -> str:
    kind = rng.randrange(3)
    n = rng.randint(2, 30)
    if kind == 0:
        return _c(f"""
            total = 0
            for i in range(1, {n}):
                total += 1 / (i - {n // 2})
            print(total)
        """)
    if kind == 1:
        return _c(f"""
            from fractions import Fraction
            a = b = {n}
            print(Fraction(1, a - b))
        """)
    return _c(f"""
        counts = [{n}, 0, {n + 1}]
        print([100 // c for c in counts])
    """)


def error_type(rng: random.Random) -> str:
    kind = rng.randrange(4)
    n = rng.randint(3, 40)
    if kind == 0:
        return _c(f"""
            import math
            print(math.comb({n}, {n} / 2))
        """)
    if kind == 1:
        return _c(f"""
            answer = {n} * 3
            print("The answer is " + answer)
        """)
    if kind == 2:
        return _c(f"""
            n = {n}
            print(len(n))
        """)
    return _c(f"""
        values = [{n}, "{n}", {n + 1}]
        print(sorted(values))
    """)


def error_index(rng: random.Random) -> str:
    kind = rng.randrange(2)
    n = rng.randint(2, 50)
    if kind == 0:
        return _c(f"""
            from sympy import symbols, solve
            x = symbols('x')
            sols = solve(x**2 + {n}, x)
            real_sols = [s for s in sols if s.is_real]
            print(real_sols)
            print(real_sols[0])
        """)
    return _c(f"""
        primes = [p for p in range(2, {n + 10}) if all(p % d for d in range(2, p))]
        print(primes[{n + 10}])
    """)


def error_syntax(rng: random.Random) -> str:
    kind = rng.randrange(5)
    n = rng.randint(2, 90)
    return [
        _c(f"""
            total = sum(range({n})
            print(total)
        """),
        _c(f"""
            print "answer:", {n}
        """),
        _c(f"""
            for i in range({n})
                print(i)
        """),
        f"x = {n}\n    y = x + 1\nprint(y)\n",
        _c(f"""
            x = = {n}
            print(x)
        """),
    ][kind]


def error_sympy(rng: random.Random) -> str:
    kind = rng.randrange(4)
    n = rng.randint(2, 20)
    if kind == 0:
        return _c(f"""
            from sympy import sympify
            expr = sympify("{n}x + 3")
            print(expr)
        """)
    if kind == 1:
        return _c(f"""
            from sympy import Matrix
            M = Matrix([[1, {n}], [2, {2 * n}]])
            print(M.det())
            print(M.inv())
        """)
    if kind == 2:
        return _c(f"""
            from sympy import symbols, Poly
            x = symbols('x')
            print(Poly(x**2 + {n}/x, x))
        """)
    return _c(f"""
        from sympy import factorint
        print(factorint({n}.5))
    """)


def error_value(rng: random.Random) -> str:
    kind = rng.randrange(5)
    n = rng.randint(2, 99)
    if kind == 0:
        return _c(f"""
            s = "{n}.5"
            print(int(s))
        """)
    if kind == 1:
        return _c(f"""
            import math
            print(math.sqrt({n} - {n + 4}))
        """)
    if kind == 2:
        return _c(f"""
            import numpy as np
            A = np.array([[1.0, 2.0], [{n}.0, {2 * n}.0]])
            print(np.linalg.solve(A, np.array([1.0, 2.0])))
        """)
    if kind == 3:
        return _c(f"""
            a, b = divmod({n}, 7), {n}
            x, y = [a, b, {n}]
            print(x, y)
        """)
    return _c(f"""
        big = 7 ** {20000 + n}
        print(len(str(big)))
    """)


def error_lookup(rng: random.Random) -> str:
    kind = rng.randrange(2)
    n = rng.randint(2, 40)
    if kind == 0:
        return _c(f"""
            squares = {{k: k * k for k in range(1, {n})}}
            print(squares[{n}])
        """)
    return _c(f"""
        digits = list(str({n * 12345}))
        digits.reverse()
        print("".join(digits))
        print(str({n}).reverse())
    """)


def error_recursion(rng: random.Random) -> str:
    n = rng.randint(5, 50)
    return _c(f"""
        def f(n):
            return n * f(n - 1)

        print(f({n}))
    """)


def error_assert(rng: random.Random) -> str:
    n = rng.randint(10, 99)
    return _c(f"""
        total = sum(range(1, {n} + 1))
        print(total)
        assert total == {n * n}, "formula check failed"
    """)


def error_exit(rng: random.Random) -> str:
    n = rng.randint(10, 99)
    return _c(f"""
        import sys
        candidates = [k for k in range(2, {n}) if k * k == {n * n + 1}]
        if not candidates:
            print("no solution found")
            sys.exit(1)
        print(candidates)
    """)


def stdin_read(rng: random.Random) -> str:
    # Nothing ever arrives on the snippet's stdin: the read waits until the timeout.
    n = rng.randint(2, 9)
    return _c(f"""
        n = int(input("n = "))
        print(n * {n})
    """)


# ---------------------------------------------------------------------------------------------
# timeouts, huge output, memory
# ---------------------------------------------------------------------------------------------


def infinite_loop(rng: random.Random) -> str:
    kind = rng.randrange(5)
    m = rng.randint(2, 50)
    return [
        "while True:\n    pass\n",
        _c(f"""
            k = 1
            # search for k with k**2 == 2*m**2 (never happens: sqrt(2) is irrational)
            while k * k != 2 * {m} ** 2:
                k += 1
            print(k)
        """),
        _c(f"""
            n = {m}
            steps = 0
            while n != 0:
                n = (3 * n + 1) % 1000003 + 1
                steps += 1
            print(steps)
        """),
        _c(f"""
            total = 0
            for n in range(10 ** 12):
                total += n % {m}
            print(total)
        """),
        _c(f"""
            from itertools import count
            for n in count(1):
                if n % 2 == 0 and n % 2 == 1:
                    break
            print(n, {m})
        """),
    ][kind]


def large_output(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        n = rng.randint(20000, 40000)
        return _c(f"""
            print(list(range({n})))
        """)
    if kind == 1:
        n = rng.randint(6000, 9000)
        return _c(f"""
            for i in range({n}):
                print(i, i * i, i * i * i)
        """)
    n = rng.randint(110000, 200000)
    return _c(f"""
        print("{rng.choice("abc")}" * {n})
    """)


def memory_bomb(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        return _c(f"""
            N = 10 ** {rng.randint(10, 11)}
            sieve = [True] * (N + 1)
            print(sum(sieve))
        """)
    if kind == 1:
        return _c(f"""
            import numpy as np
            grid = np.zeros(({rng.randint(2, 9)} * 10 ** 5, 10 ** 5))
            print(grid.sum())
        """)
    return _c(f"""
        buf = bytearray({rng.randint(2, 9)} * 10 ** 11)
        print(len(buf))
    """)


# ---------------------------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------------------------

# (category, template, expected status, how many)
TEMPLATES: list[tuple[str, Callable[[random.Random], str], str, int]] = [
    ("sympy_solve", sympy_solve, "ok", 16),
    ("sympy_simplify", sympy_simplify, "ok", 14),
    ("sympy_calculus", sympy_calculus, "ok", 10),
    ("sympy_sum", sympy_sum, "ok", 10),
    ("sympy_numbertheory", sympy_numbertheory, "ok", 14),
    ("sympy_rational", sympy_rational, "ok", 10),
    ("sympy_matrix", sympy_matrix, "ok", 6),
    ("bruteforce", bruteforce, "ok", 28),
    ("itertools", itertools_combinatorics, "ok", 18),
    ("fractions", fractions_exact, "ok", 14),
    ("math", math_functions, "ok", 14),
    ("numpy", numpy_work, "ok", 20),
    ("strings", strings, "ok", 14),
    ("dp", dynamic_programming, "ok", 12),
    ("recursion", recursion, "ok", 8),
    ("geometry", geometry, "ok", 10),
    ("probability", probability, "ok", 8),
    ("sequences", sequences, "ok", 8),
    ("unicode_output", unicode_output, "ok", 3),
    ("sys_exit_ok", sys_exit_ok, "ok", 2),
    ("main_guard", main_guard, "ok", 3),
    ("medium_output", medium_output, "ok", 4),
    ("error_name", error_name, "error", 8),
    ("error_zero_division", error_zero_division, "error", 6),
    ("error_type", error_type, "error", 6),
    ("error_index", error_index, "error", 5),
    ("error_syntax", error_syntax, "error", 5),
    ("error_sympy", error_sympy, "error", 6),
    ("error_value", error_value, "error", 6),
    ("error_lookup", error_lookup, "error", 4),
    ("error_recursion", error_recursion, "error", 2),
    ("error_assert", error_assert, "error", 2),
    ("error_exit", error_exit, "error", 1),
    ("infinite_loop", infinite_loop, "timeout", 6),
    ("stdin_read", stdin_read, "timeout", 2),
    ("large_output", large_output, "output_limit", 6),
    ("memory_bomb", memory_bomb, "memory", 3),
]


def build_corpus(seed: str = CORPUS_SEED) -> list[Snippet]:
    """The full corpus, in a fixed order, identical for a given ``seed`` on every machine.

    Each template is drawn ``count`` times with its own ``random.Random`` seeded from
    ``seed``, the category and the draw number; a draw that repeats an earlier snippet of the
    category is redrawn, so every snippet is distinct.
    """
    corpus: list[Snippet] = []
    for category, template, expect, count in TEMPLATES:
        if expect not in EXPECTED_STATUSES:
            raise ValueError(f"template {category!r}: unknown expected status {expect!r}")
        seen: set[str] = set()
        draw = 0
        while len(seen) < count:
            code = template(random.Random(f"{seed}:{category}:{draw}"))
            draw += 1
            if code in seen:
                if draw > 50 * count:
                    raise RuntimeError(f"template {category!r} cannot make {count} distinct snippets")
                continue
            seen.add(code)
            corpus.append(Snippet(f"{category}-{len(seen) - 1:03d}", category, code, expect))
    return corpus


def quick_subset(corpus: list[Snippet], per_expect: dict[str, int] | None = None) -> list[Snippet]:
    """A small deterministic slice for ``--quick``: the first few snippets of each expected status."""
    want = per_expect or {"ok": 8, "error": 3, "timeout": 1, "output_limit": 1, "memory": 1}
    taken: dict[str, int] = {}
    out: list[Snippet] = []
    seen_categories: set[str] = set()
    # Prefer variety: the first snippet of each category first, then fill up in corpus order.
    for pass_ in range(2):
        for s in corpus:
            if taken.get(s.expect, 0) >= want.get(s.expect, 0) or s in out:
                continue
            if pass_ == 0 and s.category in seen_categories:
                continue
            seen_categories.add(s.category)
            taken[s.expect] = taken.get(s.expect, 0) + 1
            out.append(s)
    order = {s.id: i for i, s in enumerate(corpus)}
    return sorted(out, key=lambda s: order[s.id])
