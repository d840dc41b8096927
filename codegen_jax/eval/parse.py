"""Does the model write code that parses? Greedy completions of function signatures, each cut where the
function ends (the first non-blank line indented no deeper than its `def`), joined to the prompt and
given to `ast.parse`; the share that parses with a real body (a statement besides the docstring, not
`pass` or a bare constant: comments alone do not count) is the parse rate (`codegen-jax eval parse`).

The default prompts are written for this check (common utility functions, not taken from the standard
library the tiny model trains on): a signature and a docstring each, with no trailing newline, so the
model writes the line break and indentation itself, as in `generate`.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Sequence

from codegen_jax.errors import UserError
from codegen_jax.jsonl import read_jsonl

_SIGNATURES = [
    ("is_palindrome(s)", "Return True if s reads the same forwards and backwards."),
    ("count_vowels(text)", "Return the number of vowels in text."),
    ("flatten(items)", "Flatten a list of lists into a single list."),
    ("chunked(seq, size)", "Split seq into consecutive chunks of at most size items."),
    ("clamp(value, low, high)", "Limit value to the range [low, high]."),
    ("merge_dicts(a, b)", "Return a new dict with the keys of a and b; b wins on conflicts."),
    ("word_frequencies(text)", "Count how often each word occurs in text."),
    ("gcd(a, b)", "Return the greatest common divisor of a and b."),
    ("is_prime(n)", "Return True if n is a prime number."),
    ("factorial(n)", "Return n factorial."),
    ("reverse_words(sentence)", "Return the sentence with its words in reverse order."),
    ("unique(items)", "Return the items without duplicates, keeping their first order."),
    ("read_lines(path)", "Read a text file and return its lines without line endings."),
    ("celsius_to_fahrenheit(c)", "Convert a temperature from Celsius to Fahrenheit."),
    ("binary_search(items, target)", "Return the index of target in the sorted list items, or -1."),
    ("transpose(matrix)", "Return the transpose of a matrix given as a list of rows."),
    ("running_sum(numbers)", "Return the list of running totals of numbers."),
    ("parse_key_values(text)", "Parse lines of key=value into a dict."),
    ("mean(values)", "Return the arithmetic mean of a non-empty list of numbers."),
    ("capitalize_words(text)", "Capitalize the first letter of every word in text."),
    ("find_max(items)", "Return the largest item, or None for an empty list."),
    ("is_anagram(a, b)", "Return True if a and b contain the same letters."),
    ("to_snake_case(name)", "Convert a CamelCase name to snake_case."),
    ("safe_divide(a, b, default=0)", "Divide a by b, returning default when b is zero."),
    ("group_by_length(words)", "Map each word length to the list of words of that length."),
    ("strip_comments(lines)", "Remove everything after a '#' in each line."),
    ("nth_fibonacci(n)", "Return the n-th Fibonacci number."),
    ("pairwise(items)", "Return the list of adjacent pairs of items."),
    ("normalize_whitespace(text)", "Collapse runs of whitespace in text into single spaces."),
    ("invert_dict(mapping)", "Swap the keys and values of a dictionary."),
    ("sum_of_squares(numbers)", "Return the sum of the squares of numbers."),
    ("count_words(text)", "Return the number of words in text."),
    ("is_even(n)", "Return True if n is even."),
    ("last_element(items)", "Return the last item of items, or None if it is empty."),
    ("remove_none(items)", "Return the items that are not None."),
    ("dict_from_pairs(pairs)", "Build a dict from a list of (key, value) pairs."),
    ("max_index(values)", "Return the index of the largest value."),
    ("repeat_string(s, n)", "Return s repeated n times, separated by spaces."),
    ("count_file_lines(path)", "Return the number of lines in the file at path."),
    ("average_length(words)", "Return the average length of the words."),
    ("filter_positive(numbers)", "Return only the numbers greater than zero."),
    ("first_word(sentence)", "Return the first word of sentence, or an empty string."),
    ("square_list(numbers)", "Return a list with the square of every number."),
    ("contains_digit(text)", "Return True if text contains at least one digit."),
    ("join_lines(lines)", "Join lines into one string with newlines between them."),
    ("swap_pair(pair)", "Return the two items of pair in the opposite order."),
    ("sort_by_length(words)", "Return the words sorted from shortest to longest."),
    ("sum_dict_values(mapping)", "Return the sum of the values of mapping."),
    ("is_sorted(items)", "Return True if items are in non-decreasing order."),
    ("count_char(text, char)", "Return how many times char occurs in text."),
    ("min_max(values)", "Return a tuple of the smallest and the largest value."),
    ("percent(part, whole)", "Return part as a percentage of whole."),
    ("write_lines(path, lines)", "Write each line to the file at path, one per line."),
    ("keys_with_value(mapping, value)", "Return the keys of mapping whose value equals value."),
    ("product(numbers)", "Return the product of all the numbers."),
    ("strip_all(strings)", "Return the strings with surrounding whitespace removed."),
    ("index_of(items, target)", "Return the first index of target in items, or -1."),
    ("take(items, n)", "Return the first n items as a list."),
    ("is_power_of_two(n)", "Return True if n is a positive power of two."),
    ("euclidean_distance(p, q)", "Return the Euclidean distance between the points p and q."),
]
DEFAULT_PROMPTS = [f'def {sig}:\n    """{doc}"""' for sig, doc in _SIGNATURES]
_DEDENT = re.compile(r"\n(?=\S)")  # a line break followed by an unindented, non-blank line


def function_end(prompt: str, completion: str) -> str:
    """The completion cut where the prompt's function ends: at the first line that starts at the
    `def`'s indentation or less (blank lines do not count)."""
    indent = len(prompt) - len(prompt.lstrip(" "))
    if indent == 0:
        m = _DEDENT.search(completion)
        return completion if m is None else completion[:m.start()]
    lines, out = completion.split("\n"), []
    for i, line in enumerate(lines):
        if i and line.strip() and len(line) - len(line.lstrip(" ")) <= indent:
            break
        out.append(line)
    return "\n".join(out)


def parses(code: str) -> str | None:
    """None when `code` parses as Python and its function has a body beyond the docstring (a statement
    that is not `pass` or `...`: comments alone, which parse, are not code), else what is wrong."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        return f"{type(e).__name__}: {e}"
    funcs = _outer_functions(tree)
    if not funcs:
        return "no function"
    # the completed function is the last one not nested in another: helpers may precede it in the prompt
    body = max(funcs, key=lambda f: f.lineno).body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring
    trivial = (ast.Pass,)
    if not [st for st in body if not isinstance(st, trivial)
            and not (isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant))]:
        return "empty body: the function has no statement besides its docstring (comments do not count)"
    return None


def _outer_functions(tree: ast.AST) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Functions not defined inside another function (module level, or methods of classes)."""
    out, todo = [], [tree]
    while todo:
        for child in ast.iter_child_nodes(todo.pop()):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append(child)
            else:
                todo.append(child)
    return out


def score(prompts: Sequence[str], completions: Sequence[str], hit_limit: Sequence[bool] | None = None) -> dict:
    """Parse rate of prompt + completion (cut at the function's end), with every failure.

    `hit_limit[i]`: completion i stopped at the token limit. One that did with no line back at the
    `def`'s indentation is `ended: False`, still inside its function (its last line may be cut), and
    the failures of that kind are counted apart (`unfinished`): a long body, not a short wrong one."""
    hit_limit = [False] * len(completions) if hit_limit is None else hit_limit
    results = []
    for prompt, completion, limited in zip(prompts, completions, hit_limit, strict=True):
        body = function_end(prompt, completion)
        error = parses(prompt + body)
        ended = not limited or body != completion
        results.append({"prompt": prompt, "completion": body, "parsed": error is None, "error": error, "ended": ended})
    n_ok = sum(r["parsed"] for r in results)
    failures = [r for r in results if not r["parsed"]]
    return {"parse_rate": n_ok / max(len(results), 1), "parsed": n_ok, "total": len(results), "failures": failures,
            "unfinished": sum(not r["ended"] for r in failures), "results": results}


def load_prompts(path: str | os.PathLike | None) -> list[str]:
    """`DEFAULT_PROMPTS`, or a JSONL file of {"prompt": ...} lines."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    rows = [obj for _, obj in read_jsonl(path, "prompts")]
    if not rows or not all(isinstance(r.get("prompt"), str) for r in rows):
        raise UserError(f"prompts file {path} needs a string 'prompt' on every line")
    if bad := [i + 1 for i, r in enumerate(rows) if not re.search(r"^\s*(async\s+)?def ", r["prompt"], re.M)]:
        raise UserError(f"prompts file {path}: line {bad[0]} has no 'def': each prompt starts a function to complete")
    return [r["prompt"] for r in rows]


def run_parse_eval(generator, prompts: Sequence[str] | None = None, max_new_tokens: int = 160,
                   **sampling) -> dict:
    """Greedy completions of `prompts` (default: `DEFAULT_PROMPTS`) from a `Generator`, scored. The
    generation stops early at a line that starts a new top-level statement (`\\n` followed by a
    letter, `@` or `#`), which is past the function's end anyway."""
    prompts = list(DEFAULT_PROMPTS if prompts is None else prompts)
    stops = ["\ndef ", "\nclass ", "\nif __name__", "\n@", "\n#", "\nprint("]
    outs = generator.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0, stop=stops, **sampling)
    report = score(prompts, [o[0].text for o in outs], [o[0].finish_reason == "length" for o in outs])
    return {**report, "max_new_tokens": max_new_tokens, **sampling}
