"""Secrets and PII redaction: keys and tokens -> `<KEY>`, passwords -> `<PASSWORD>`, e-mail addresses ->
`<EMAIL>`, public IP addresses -> `<IP_ADDRESS>` (BigCode's placeholders), counted per kind.

- Tokens with a recognisable shape (AWS, GitHub, GitLab, Slack, Stripe, OpenAI, npm, PyPI, JWT,
  Twilio, SendGrid, Discord, Azure, IBM, ...) are found by detect-secrets' regex plugins, URL
  credentials (`://user:pass@`) by its basic-auth plugin.
- What detect-secrets does not cover: whole private-key blocks (its plugin flags only the BEGIN
  line), GCP API keys (`AIza...`), and high-entropy values assigned to secret-sounding names
  (`password`, `secret`, `token`, `api_key`, ...; quoted in code, also bare in config files).
- A value is replaced only when it looks random (`looks_secret`): on the stdlib, words such as
  `token_type = 'quoted-string'` or the `password` of `http://joe:password@proxy` are left alone.
- E-mails and IPs: datatrove's `PIIFormatter` regexes. Kept: documentation and example
  addresses (example.com/.org/.net and the .example/.test/.invalid/.localhost names, non-global
  IPs: 127.0.0.1, private and documentation ranges).
"""

from __future__ import annotations

import collections
import functools
import inspect
import math
import re

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.formatters.pii import PIIFormatter, public_ip_validator

from codegen_jax.data.prepare.store import write_counts

KEY, PASSWORD, EMAIL, IP = "<KEY>", "<PASSWORD>", "<EMAIL>", "<IP_ADDRESS>"
KINDS = {KEY: "key", PASSWORD: "password", EMAIL: "email", IP: "ip_address"}
_PRIVATE_KEY = re.compile(r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----.*?-----END \1-----", re.DOTALL)
# A header without its END (a truncated file, or a key cut into string pieces): up to the end of the base64
_PRIVATE_KEY_HEAD = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----(?:\\n|[\sA-Za-z0-9+/=])*")
_GCP_API_KEY = re.compile(r"\bAIza[0-9A-Za-z_\-]{35}\b")
_PASSWORD_NAMES = r"passw(?:or)?d|pwd|passphrase"
_SECRET_NAMES = rf"{_PASSWORD_NAMES}|secret|token|api_?key|apikey|access_?key|auth_?key|private_?key|credential"
_ASSIGNMENT = re.compile(
    rf"(?P<name>[\w.\-]*(?:{_SECRET_NAMES})[\w.\-]*)[\"'\]]*[ \t]*(?::=|=>|=|:)[ \t]*"
    r"(?P<quote>[\"'`]?)(?P<value>[^\s\"'`,;]{8,})(?P=quote)", re.IGNORECASE)
_IS_PASSWORD = re.compile(_PASSWORD_NAMES, re.IGNORECASE)
# Names about a secret rather than holding one: token_type, password_file, secret_key_name, ...
_NOT_SECRET = re.compile(r"[_.\-](?:type|name|id|file|path|dir|url|field|len|length|count|size|kind|mode|format|"
                         r"class|prefix|suffix|header|env|var|regex|pattern|label|hint|prompt)s?$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"[<>{}$%()\[\]]|^(\w)\1+$|^x+$|(?i:changeme|example|dummy|placeholder|redacted)")
# Bare (unquoted) assigned values count only in these; in code a bare value is an expression.
_CONFIG_LANGUAGES = frozenset({"yaml", "toml", "shell", "dockerfile", "makefile", "text", "unknown", "xml"})
# detect-secrets plugins that match `<vendor>_<key|pass|token> = value`: only lines with such a name can match
_NAMED_PLUGINS = frozenset({"CloudantDetector", "IbmCloudIamDetector", "IbmCosHmacDetector", "SoftlayerDetector"})
_NAME_HINT = re.compile(rf"{_SECRET_NAMES}|key|pw|pass|cloudant|softlayer", re.IGNORECASE)
_NAME_LITERALS = ("pass", "pw", "secret", "token", "key", "credential", "cloudant", "softlayer")  # lower case
# A literal every pattern of the plugin needs (checked in detect-secrets 1.5): lines without one are skipped
_GATES = {"ArtifactoryDetector": ("AKC", "AP"), "AWSKeyDetector": ("A3T", "ABIA", "ACCA", "AKIA", "ASIA", "aws", "AWS",
                                                                   "Aws"),
          "AzureStorageKeyDetector": ("AccountKey=",), "BasicAuthDetector": ("://",), "MailchimpDetector": ("-us",),
          "SlackDetector": ("xox", "XOX", "hooks.slack.com"), "TwilioKeyDetector": ("AC", "SK"),
          "NpmDetector": ("_authToken",), "OpenAIDetector": ("T3BlbkFJ",), "PypiTokenDetector": ("pypi-",),
          "SendGridDetector": ("SG.",), "SquareOAuthDetector": ("sq0csp-",), "StripeDetector": ("k_live_",),
          "GitHubTokenDetector": ("gh",), "GitLabTokenDetector": ("gl", "GR1348941"), "JwtTokenDetector": ("eyJ",)}
MIN_ENTROPY = 3.0  # bits per character (detect-secrets' hex-string limit), on values of >= 8 characters
_IP_HINT = re.compile(r"\d\.\d{1,3}\.\d")
_EXAMPLE_DOMAINS = ("example.com", "example.org", "example.net")
_RESERVED_TLDS = ("example", "test", "invalid", "localhost", "local")


def entropy(value: str) -> float:
    """Shannon entropy of the characters of `value`, in bits per character."""
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in collections.Counter(value).values())


@functools.lru_cache(maxsize=1)
def _token_plugins() -> tuple[tuple, tuple]:
    """detect-secrets' regex plugins as (placeholder, plugin): those for tokens of a recognisable shape
    (run on the whole text), and those that need a secret-sounding name first (run on hinted lines)."""
    import importlib
    import pkgutil

    import detect_secrets.plugins as plugins_pkg
    from detect_secrets.plugins.base import RegexBasedDetector

    skip = {"PrivateKeyDetector", "IPPublicDetector"}  # whole blocks, and IPs: handled here and by RedactPII
    shaped, named = [], []
    for info in sorted(pkgutil.iter_modules(plugins_pkg.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"detect_secrets.plugins.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if (issubclass(cls, RegexBasedDetector) and cls is not RegexBasedDetector
                    and cls.__module__ == module.__name__ and name not in skip):
                entry = (PASSWORD if name == "BasicAuthDetector" else KEY, cls())
                (named if name in _NAMED_PLUGINS else shaped).append(entry)
    return tuple(shaped), tuple(named)


def _hits(text: str, hint: re.Pattern | tuple[str, ...], fold: bool) -> list[int]:
    """Sorted positions of the first hit of `hint` (a pattern, or literals: any of them) on each line."""
    hay = text.lower() if fold else text
    if isinstance(hint, re.Pattern) or len(hay) != len(text):  # lower() changed the length: the regex
        pattern = hint if isinstance(hint, re.Pattern) else _NAME_HINT
        return [m.start() for m in pattern.finditer(text)]
    hits = []
    for literal in hint:
        pos = hay.find(literal)
        while pos >= 0:
            hits.append(pos)
            newline = hay.find("\n", pos)
            pos = hay.find(literal, newline + 1) if newline >= 0 else -1
    return sorted(hits)


def on_lines(text: str, hint: re.Pattern | tuple[str, ...], fn, fold: bool = False) -> str:
    """`text` with `fn(line)` in place of every line holding `hint` (a pattern, or literals, lower-cased
    text with `fold`): the costly patterns then scan the few lines that can match, not the whole file."""
    hits = _hits(text, hint, fold)
    if not hits:
        return text
    out, done = [], 0
    for pos in hits:
        if pos < done:
            continue
        start = text.rfind("\n", 0, pos) + 1
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        out += [text[done:start], fn(text[start:end])]
        done = end
    out.append(text[done:])
    return "".join(out)


def looks_secret(value: str) -> bool:
    """Random-looking: 8+ characters of at least two of lower case, upper case and digits, entropy >=
    MIN_ENTROPY, not a placeholder. Words (`quoted-string`, `password`) and templates stay."""
    classes = any(c.islower() for c in value) + any(c.isupper() for c in value) + any(c.isdigit() for c in value)
    return (len(value) >= 8 and classes >= 2 and not _PLACEHOLDER.search(value)
            and entropy(value) >= MIN_ENTROPY)


def _replace_found(text: str, plugins: tuple, counts: collections.Counter, gated: bool = False) -> str:
    """Every random-looking value the plugins find, replaced wherever it occurs. With `gated`, a plugin
    whose patterns all need one of its `_GATES` literals scans only the lines holding one."""
    def replace(s: str, plugin, placeholder: str) -> str:
        for value in sorted(set(plugin.analyze_string(s))):
            if looks_secret(value) and value in s:
                counts[KINDS[placeholder]] += s.count(value)
                s = s.replace(value, placeholder)
        return s

    for placeholder, plugin in plugins:
        gate = _GATES.get(type(plugin).__name__) if gated else None
        if gate is None:
            text = replace(text, plugin, placeholder)
        else:
            text = on_lines(text, gate, lambda line, p=plugin, ph=placeholder: replace(line, p, ph))
    return text


def redact_secrets(text: str, language: str, counts: collections.Counter) -> str:
    """`text` with keys, tokens and secret-looking assigned values replaced; `counts[kind]` += each."""
    def sub(pattern: re.Pattern, placeholder: str, s: str) -> str:
        s, n = pattern.subn(placeholder, s)
        counts[KINDS[placeholder]] += n
        return s

    if "PRIVATE KEY" in text:
        text = sub(_PRIVATE_KEY_HEAD, KEY, sub(_PRIVATE_KEY, KEY, text))
    if "AIza" in text:
        text = sub(_GCP_API_KEY, KEY, text)
    shaped, named = _token_plugins()
    text = _replace_found(text, shaped, counts, gated=True)
    bare_ok = language in _CONFIG_LANGUAGES

    def assignment(m: re.Match) -> str:
        value = m.group("value")
        if (not m.group("quote") and not bare_ok) or not looks_secret(value) or _NOT_SECRET.search(m.group("name")):
            return m.group(0)
        placeholder = PASSWORD if _IS_PASSWORD.search(m.group("name")) else KEY
        counts[KINDS[placeholder]] += 1
        return m.group(0)[:m.start("value") - m.start()] + placeholder + m.group("quote")

    return on_lines(text, _NAME_LITERALS, lambda line: _ASSIGNMENT.sub(assignment, _replace_found(line, named, counts)),
                    fold=True)


def is_example_email(address: str) -> bool:
    """True for documentation addresses: example.com/.org/.net (and subdomains), reserved TLDs."""
    domain = address.rsplit("@", 1)[-1].lower().rstrip(".")
    return (domain in _EXAMPLE_DOMAINS or domain.endswith(tuple("." + d for d in _EXAMPLE_DOMAINS))
            or domain.rsplit(".", 1)[-1] in _RESERVED_TLDS)


class RedactSecrets(PipelineStep):
    """Replace keys, tokens and passwords (see the module docstring); counts per kind."""

    type = "✂️ - FORMAT"
    name = "🔑 secrets"

    def __init__(self, root: str):
        super().__init__()
        self.root = root

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        counts: collections.Counter = collections.Counter()
        for doc in data:
            with self.track_time():
                doc.text = redact_secrets(doc.text, doc.metadata["language"], counts)
                if "prompt" in doc.metadata:
                    doc.metadata["prompt"] = redact_secrets(doc.metadata["prompt"], doc.metadata["language"], counts)
            yield doc
        for kind, n in counts.items():
            self.stat_update(kind, value=n)
        write_counts(self.root, "secrets", rank, {"redacted": dict(counts)})


class RedactPII(PIIFormatter):
    """datatrove's PII formatter with our placeholders: e-mails and public IPs, example addresses kept."""

    name = "📞 PII"

    def __init__(self, root: str):
        super().__init__(email_replacement=EMAIL, ip_replacement=IP)
        self.root = root
        self.counts: collections.Counter = collections.Counter()
        self.emails_replacer.validator = functools.partial(self._counted, "email", lambda a: not is_example_email(a))
        self.ip_replacer.validator = functools.partial(self._counted, "ip_address", public_ip_validator)

    def format(self, text: str) -> str:
        """The formatter's replacements, on the lines that hold an @ or a dotted number only."""
        if self.remove_emails:
            text = on_lines(text, ("@",), self.emails_replacer.replace)
        if self.remove_ips:
            text = on_lines(text, _IP_HINT, self.ip_replacer.replace)
        return text

    def _counted(self, kind: str, validator, match: str) -> bool:
        if validator(match):
            self.counts[kind] += 1
            return True
        return False

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.counts = collections.Counter()  # this task's (an executor may run several in one copy of the step)
        for doc in super().run(data, rank, world_size):
            if "prompt" in doc.metadata:
                doc.metadata["prompt"] = self.format(doc.metadata["prompt"])
            yield doc
        write_counts(self.root, "pii", rank, {"redacted": dict(self.counts)})
