"""Password rules after NIST SP 800-63B section 5.1.1: length, and no common or breached password.

No composition rules (NIST advises against them): a password is refused when it is shorter than
PASSWORD_MIN characters, longer than PASSWORD_MAX (hashing a megabyte costs the server, not the
guesser), on the list of common passwords, one short unit repeated ("aaaaaaaaaaaa",
"abcabcabcabc"), a run of consecutive characters ("123456789012"), or built on the account's email.

`common-passwords.txt.gz` is Django 5.2's list (django/contrib/auth/common-passwords.txt.gz, BSD
licence): the 20,000 most common passwords of Royce Williams' breach corpus, lower-cased. It is
vendored so that nothing is fetched at run time; to reproduce it, unzip that path from the
Django 5.2 wheel.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

PASSWORD_MIN = 12
PASSWORD_MAX = 1024
COMMON_PASSWORDS = Path(__file__).with_name("common-passwords.txt.gz")


@functools.cache
def common_passwords() -> frozenset[str]:
    with gzip.open(COMMON_PASSWORDS, "rt", encoding="utf-8") as f:
        return frozenset(line.strip() for line in f if line.strip())


def _repeated_unit(password: str) -> bool:
    """True for one unit of 1-3 characters repeated: 'aaaa...', 'abab...', 'abcabc...'."""
    return any(len(password) % n == 0 and password == password[:n] * (len(password) // n) for n in (1, 2, 3))


# Runs along the digits, the alphabet and the keyboard rows, wrapping round ("...7890123...").
RUNS = [run * 4 for run in ("0123456789", "abcdefghijklmnopqrstuvwxyz", "qwertyuiopasdfghjklzxcvbnm")]
RUNS += [run[::-1] for run in RUNS]


def _consecutive(password: str) -> bool:
    """True for a run of consecutive characters: '123456789012', 'zyxwvutsrqpo', 'qwertyuiopas'."""
    return any(password in run for run in RUNS)


def password_problem(password: str, email: str = "") -> str | None:
    """Why `password` is refused, as a sentence for the person choosing it; None when it is fine."""
    password = password or ""
    if len(password) < PASSWORD_MIN:
        return f"The password must have at least {PASSWORD_MIN} characters."
    if len(password) > PASSWORD_MAX:
        return f"The password must have at most {PASSWORD_MAX} characters."
    folded = password.strip().lower()
    if folded in common_passwords():
        return "This password is on a list of common or breached passwords; choose another."
    if _repeated_unit(folded) or _consecutive(folded):
        return "The password repeats or counts characters; choose one that is harder to guess."
    name = email.partition("@")[0].strip().lower()
    if len(name) >= 4 and name in folded:
        return "The password must not contain the account's email name."
    return None
