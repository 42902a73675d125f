"""NG-word and host filters of the Swallow-style corpus pipeline.

`NgWords` rejects documents whose NG words (found with an Aho-Corasick automaton, leftmost-longest and
non-overlapping) cover too large a share of their Japanese letters. `HostFilter` rejects pages by host: by
domain suffix (on label boundaries) or by block lists such as the UT1 blacklists
(https://dsi.ut-capitole.fr/blacklists/), whose layout is `<dir>/<category>/domains`, one domain a line.
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable, Mapping

import ahocorasick

from jpllm_jax.corpus.quality import count_japanese_letters


def _read_list(path: str | os.PathLike) -> list[str]:
  """Stripped lines of a UTF-8 file, without blank lines and lines starting with '#'."""
  with open(path, encoding="utf-8") as f:
    return [s for s in (line.strip() for line in f) if s and not s.startswith("#")]


class NgWords:
  """A list of NG words and the share of a text's Japanese letters they cover."""

  def __init__(self, words: Iterable[str]):
    self.words = sorted({w for w in words if w})
    self._automaton = ahocorasick.Automaton()
    for word in self.words:
      self._automaton.add_word(word, len(word))
    if self.words:
      self._automaton.make_automaton()

  @classmethod
  def from_file(cls, path: str | os.PathLike) -> NgWords:
    """One word a line (UTF-8); blank lines and lines starting with '#' are ignored."""
    return cls(_read_list(path))

  def matches(self, text: str) -> list[tuple[int, str]]:
    """Leftmost-longest, non-overlapping NG-word matches as (start index, word)."""
    if not self.words:
      return []
    return [(end - length + 1, text[end - length + 1:end + 1]) for end, length in self._automaton.iter_long(text)]

  def ng_fraction(self, text: str) -> float:
    """Characters of the matched NG words / Japanese letters of `text` (0 when either is 0)."""
    if not self.words:
      return 0.0
    matched = sum(length for _, length in self._automaton.iter_long(text))
    if not matched:
      return 0.0
    letters = count_japanese_letters(text)
    return matched / letters if letters else 0.0

  def reject_reason(self, text: str, threshold: float = 0.05) -> str | None:
    """Returns "ng_words" when the NG-word fraction is >= `threshold`, else None."""
    return "ng_words" if self.words and self.ng_fraction(text) >= threshold else None


def normalize_host(host: str) -> str:
  """Lowercased host without surrounding whitespace, IPv6 brackets, a port or a trailing dot."""
  host = host.strip().lower()
  if host.startswith("["):  # [v6 address]:port
    return host[1:].partition("]")[0]
  name, sep, port = host.rpartition(":")
  if sep and port.isdigit() and ":" not in name:
    host = name
  return host.rstrip(".")


class HostFilter:
  """Rejects hosts by domain suffix or by category block lists.

  `suffixes` match on label boundaries: "example.com" blocks "example.com" and "a.example.com" but not
  "badexample.com"; a leading dot is optional (".xxx" and "xxx" both block "a.xxx"). `blocked_hosts` are
  domains whose subdomains are blocked too: a mapping from domain to category, or an iterable of domains
  (category "custom") or of (domain, category) pairs.
  """

  def __init__(self, suffixes: Iterable[str] = (),
               blocked_hosts: Mapping[str, str] | Iterable[str | tuple[str, str]] = ()):
    self.suffixes = frozenset(normalize_host(s).lstrip(".") for s in suffixes) - {""}
    items = blocked_hosts.items() if isinstance(blocked_hosts, Mapping) else blocked_hosts
    self.blocked: dict[str, str] = {}
    for item in items:
      domain, category = (item, "custom") if isinstance(item, str) else item
      self.blocked.setdefault(normalize_host(domain), category)
    self.blocked.pop("", None)

  @classmethod
  def from_ut1(cls, directory: str | os.PathLike, categories: Iterable[str] | None = None,
               suffixes: Iterable[str] = ()) -> HostFilter:
    """Reads `<directory>/<category>/domains` for the given categories (default: every category directory
    that has a `domains` file, in sorted order). A domain listed in several categories gets the first."""
    root = pathlib.Path(directory)
    if categories is None:
      categories = sorted(p.parent.name for p in root.glob("*/domains") if p.is_file())
    blocked = [(domain, category) for category in categories for domain in _read_list(root / category / "domains")]
    return cls(suffixes, blocked)

  def reject_reason(self, host: str) -> str | None:
    """Returns "host_suffix", "host_blocklist:<category>" (the host or a parent domain is listed) or None."""
    host = normalize_host(host)
    if not host:
      return None
    labels = host.split(".")
    parents = [".".join(labels[i:]) for i in range(len(labels))]
    if any(p in self.suffixes for p in parents):
      return "host_suffix"
    for parent in parents:
      category = self.blocked.get(parent)
      if category is not None:
        return f"host_blocklist:{category}"
    return None
