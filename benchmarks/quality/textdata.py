"""Real text found offline on a Debian machine, as named domains, split into train / router / eval.

A *source* is a named set of documents: English man pages, Python's standard library,
C headers, translated man pages, message catalogues, licenses. Two default *domain sets*
use different sources, so a result can be checked on data it was not developed on:

    A: man-en, python, man-de, mo-ru           (the one reported first)
    B: licenses, c-headers, man-fr, mo-ja      (the independent re-run)

A document becomes *chunks*: consecutive lines joined with one space, at most `max_bytes`
UTF-8 bytes (a model's context minus the BOS token), cut at paragraph breaks. A chunk is one
line of text — what an eval item, a training sequence start and a router sample are.

Splits are by document, so no paragraph leaks from training into evaluation: documents are
taken in the order of the SHA-1 of their path (fixed, whatever the file system's order) and
dealt round-robin, 1 in 10 to eval, 1 in 10 to the router samples, the rest to training, each
split until its quota is full; a document gives at most a few chunks (`per_doc_cap`), evenly
spaced through it, so a split is drawn from many documents.
"""

from __future__ import annotations

import glob
import gettext
import gzip
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# -----------------------------------------------------------------------------
# the sources

MAN = Path("/usr/share/man")


@dataclass(frozen=True)
class Source:
    description: str
    patterns: tuple[str, ...]  # globs of its files
    read: Callable[[Path], list[str]]  # a file's lines of text
    keep: Callable[[str], bool] = lambda chunk: True  # drop chunks that do not belong


def read_text(path: Path) -> list[str]:
    """A UTF-8 file's lines ([] when it is not UTF-8: it is skipped, never guessed)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return []


# roff special characters that carry letters (the rest are dropped)
ROFF_CHARS = {":a": "ä", ":o": "ö", ":u": "ü", ":A": "Ä", ":O": "Ö", ":U": "Ü", "ss": "ß",
              "'e": "é", "`e": "è", "^e": "ê", "`a": "à", "^a": "â", ",c": "ç", "^o": "ô",
              "^i": "î", "'E": "É", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘",
              "cq": "’", "em": "—", "en": "–", "hy": "-", "bu": "•", "co": "©", "Fo": "«",
              "Fc": "»", "fo": "‹", "fc": "›", "rs": "\\", "ti": "~", "ha": "^", "mu": "×",
              "<=": "≤", ">=": "≥", "->": "→", "de": "°"}
ROFF_FONT_MACROS = {"B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB", "SH", "SS", "TP",
                    "IP", "UR", "MT", "Nm", "Nd", "Ar", "Fl", "Op", "Pa", "Xr", "Dt", "Sh"}


def strip_roff(lines: list[str]) -> list[str]:
    """Man-page source to plain text: macro lines give their words, escapes their letters.

    Good enough for language-model text, not a renderer: requests other than the font and
    heading macros are dropped, a paragraph macro becomes a paragraph break.
    """
    out: list[str] = []
    for line in lines:
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue  # comments
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            if macro not in ROFF_FONT_MACROS:
                out.append("")  # .PP, .RS, .TH, .de ...: a paragraph break at most
                continue
            line = rest.replace('"', "")
        out.append(roff_escapes(line))
    return out


def roff_escapes(text: str) -> str:
    text = re.sub(r"\\\((..)", lambda m: ROFF_CHARS.get(m.group(1), ""), text)  # \(:o
    text = re.sub(r"\\\[([^\]]*)\]", lambda m: ROFF_CHARS.get(m.group(1), ""), text)  # \[:o]
    text = re.sub(r"\\f(\(..|\[[^\]]*\]|.)", "", text)  # font changes \fB \f(CW \f[I]
    text = re.sub(r"\\s[+-]?\d", "", text)  # size changes
    text = re.sub(r"\\\*(\(..|\[[^\]]*\]|.)", "", text)  # string interpolations \*(Aq
    text = re.sub(r"\\[nw]('[^']*'|\(..|.)", "", text)  # registers, widths
    text = text.replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
    return re.sub(r"\\[&|^/,%:~0c)]", "", text)  # zero-width and spacing escapes


def read_man(path: Path) -> list[str]:
    return strip_roff(read_text(path))


ENGLISH_WORDS = {"the", "and", "of", "to", "is", "are", "this", "that", "with", "for", "which",
                 "be", "by", "if", "or", "not", "it", "when", "from", "an", "on", "can"}


def not_english(chunk: str) -> bool:
    """False for untranslated English paragraphs, which translated man pages often keep."""
    words = re.findall(r"[a-z]+", chunk.lower())
    return not words or sum(w in ENGLISH_WORDS for w in words) / len(words) < 0.12


def read_mo(path: Path) -> list[str]:
    """The translated strings (msgstr) of a compiled message catalogue, one paragraph each."""
    try:
        with path.open("rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog  # msgid -> msgstr
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    lines: list[str] = []
    for msgid, msgstr in sorted(catalog.items(), key=lambda kv: str(kv[0])):
        if msgid and isinstance(msgstr, str):  # msgid "" is the catalogue's header
            lines.extend(msgstr.splitlines())
    return lines


def man_source(lang: str) -> Source:
    """The man pages translated into ``lang`` (a /usr/share/man subfolder)."""
    return Source(f"man pages in {lang} ({MAN}/{lang}/man*/*.gz), roff stripped, English "
                  "paragraphs dropped", (f"{MAN}/{lang}/man*/*.gz",), read_man, not_english)


def mo_source(lang: str) -> Source:
    return Source(f"translated program messages in {lang} "
                  f"(/usr/share/locale/{lang}/LC_MESSAGES/*.mo msgstr)",
                  (f"/usr/share/locale/{lang}/LC_MESSAGES/*.mo",), read_mo, not_english)


SOURCES: dict[str, Source] = {
    "man-en": Source(f"English man pages ({MAN}/man[1-8]/*.gz), roff stripped",
                     (f"{MAN}/man[1-8]/*.gz",), read_man),
    "python": Source("Python sources (/usr/lib/python3*/**/*.py)",
                     ("/usr/lib/python3*/**/*.py",), read_text),
    "c-headers": Source("C headers (/usr/include/**/*.h)", ("/usr/include/**/*.h",), read_text),
    "licenses": Source("license texts (/usr/share/common-licenses/*, /usr/share/doc/*/copyright)",
                       ("/usr/share/common-licenses/*", "/usr/share/doc/*/copyright"), read_text),
    "locales": Source("glibc locale definitions (/usr/share/i18n/locales/*)",
                      ("/usr/share/i18n/locales/*",), read_text),
    **{f"man-{lang}": man_source(lang) for lang in ("de", "fr", "ru", "ja", "pt", "sv", "nl",
                                                    "it", "pl")},
    **{f"mo-{lang}": mo_source(lang) for lang in ("ja", "de", "fr", "ru", "es", "zh_CN")},
}

DOMAIN_SETS: dict[str, tuple[str, ...]] = {
    "A": ("man-en", "python", "man-de", "mo-ru"),
    "B": ("licenses", "c-headers", "man-fr", "mo-ja"),
}


def resolve_domains(spec: str) -> tuple[str, tuple[str, ...]]:
    """``A``/``B`` or a comma list of source names -> (set label, source names)."""
    if spec in DOMAIN_SETS:
        return spec, DOMAIN_SETS[spec]
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in SOURCES]
    if unknown or len(names) < 2:
        raise SystemExit(f"--domains {spec!r}: give a set ({', '.join(DOMAIN_SETS)}) or at least "
                         f"two of: {', '.join(SOURCES)}" + (f" (unknown: {unknown})" if unknown
                                                          else ""))
    return "custom-" + "-".join(names), names


# -----------------------------------------------------------------------------
# documents -> chunks -> splits

def source_files(source: Source) -> list[Path]:
    """Every file of the source, in SHA-1-of-path order (deterministic, well mixed)."""
    files = {Path(p) for pattern in source.patterns for p in glob.glob(pattern, recursive=True)}
    files = [f for f in files if f.is_file()]
    return sorted(files, key=lambda f: hashlib.sha1(str(f).encode()).hexdigest())


def chunks_of(lines: list[str], max_bytes: int, min_bytes: int) -> list[str]:
    """Consecutive lines joined by one space into chunks of min_bytes..max_bytes UTF-8 bytes.

    A blank line ends a chunk (paragraphs stay apart); a line longer than max_bytes is cut
    at a character boundary. Whitespace runs become one space, so code loses its indentation:
    a chunk must be one line, because router sample files hold one sample per line.
    """
    out: list[str] = []
    current = ""

    def flush() -> None:
        nonlocal current
        if len(current.encode("utf-8")) >= min_bytes:
            out.append(current)
        current = ""

    for raw in lines:
        line = " ".join(raw.split())
        if not line:
            flush()
            continue
        while len(line.encode("utf-8")) > max_bytes:  # an overlong line: its own chunks
            flush()
            head = line.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
            current, line = head, line[len(head):].lstrip()
        joined = f"{current} {line}" if current else line
        if len(joined.encode("utf-8")) > max_bytes:
            flush()
            joined = line
        current = joined
    flush()
    return out


@dataclass
class Domain:
    name: str
    description: str
    train: list[str]
    router: list[str]
    eval: list[str]
    documents: dict[str, int]  # documents read per split

    @property
    def train_bytes(self) -> int:
        return sum(len(c.encode("utf-8")) for c in self.train)


def load_domain(name: str, max_bytes: int, n_eval: int, n_router: int,
                train_bytes: int) -> Domain:
    """Read the source's documents lazily until the three splits are full."""
    source = SOURCES[name]
    files = source_files(source)
    min_bytes = max(8, max_bytes // 4)
    quotas = {"eval": n_eval, "router": n_router, "train": train_bytes // (max_bytes * 3 // 4)}
    shares = {"eval": 0.1, "router": 0.1, "train": 0.8}  # the round-robin deal below
    caps = {s: per_doc_cap(quotas[s], shares[s] * len(files), low)
            for s, low in (("eval", 8), ("router", 4), ("train", 32))}
    splits: dict[str, list[str]] = {"eval": [], "router": [], "train": []}
    docs = {"eval": 0, "router": 0, "train": 0}
    used_train = 0
    for i, path in enumerate(files):
        split = {0: "eval", 5: "router"}.get(i % 10, "train")
        full = {"eval": len(splits["eval"]) >= n_eval,
                "router": len(splits["router"]) >= n_router, "train": used_train >= train_bytes}
        if all(full.values()):
            break
        if full[split]:
            continue
        chunks = [c for c in chunks_of(source.read(path), max_bytes, min_bytes) if source.keep(c)]
        if not chunks:
            continue
        taken = spread(chunks, caps[split])
        docs[split] += 1
        if split == "train":
            used_train += sum(len(c.encode("utf-8")) for c in taken)
            splits["train"].extend(taken)
        else:
            quota = n_eval if split == "eval" else n_router
            splits[split].extend(taken[:quota - len(splits[split])])
    domain = Domain(name, source.description, splits["train"], splits["router"], splits["eval"],
                    docs)
    if len(domain.eval) < n_eval or len(domain.router) < n_router or not domain.train:
        raise SystemExit(f"source {name}: only {len(domain.eval)} eval / {len(domain.router)} "
                         f"router chunks / {domain.train_bytes} training bytes on this machine "
                         f"(need {n_eval} / {n_router} / some); choose other --domains")
    return domain


def per_doc_cap(quota: int, documents: float, low: int) -> int:
    """Chunks one document may give: enough that half the split's documents fill its quota."""
    return max(low, math.ceil(2 * quota / max(documents, 1.0)))


def spread(chunks: list[str], k: int) -> list[str]:
    """At most k chunks, evenly spaced through the document (not just its beginning)."""
    if len(chunks) <= k:
        return chunks
    step = len(chunks) / k
    return [chunks[int(i * step)] for i in range(k)]


def digest(domains: list[Domain]) -> str:
    """SHA-256 of every split's text: the cache key's data part."""
    h = hashlib.sha256()
    for d in domains:
        for split in (d.train, d.router, d.eval):
            h.update(d.name.encode() + b"\0" + "\n".join(split).encode("utf-8") + b"\1")
    return h.hexdigest()
