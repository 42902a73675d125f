"""A synthetic web crawl built from REAL Japanese paragraphs, as WARC/1.0 files with a ground-truth manifest.

The paragraphs (e.g. the `text` of ../shared/data/text_ja/pretrain_ja.jsonl, passed in by the caller; this
module ships no text) are composed into article bodies of 3-8 paragraphs (>= 450 characters) and wrapped in
page templates of generated Japanese sites: header, `<nav><ul><li>` menus, breadcrumbs, a sidebar with ads
and link lists, a footer with 会社概要 / プライバシーポリシー / Copyright ©. The body is always the `<p>`
paragraphs of the `<div class="entry-content">` inside `<article>`; a page's BODY text is those paragraphs
(HTML-unescaped) joined with "\\n", and every Jaccard in the manifest is the exact character-5-gram Jaccard of
two BODY texts (`minhash.jaccard`).

Page kinds (default shares in `DEFAULT_FRACTIONS`):

  unique     an article whose body shares at most one paragraph with any other unplanned body and has no
             paragraph over 40% of its length, so two unrelated bodies have Jaccard <= ~1/4;
  exact_dup  the body of a `unique` page on another site and template (Jaccard 1);
  near_dup   that body with a few characters / phrases / sentences edited: Jaccard in [0.9, 1);
  similar    sentences replaced, inserted or deleted, characters edited: Jaccard in [0.5, 0.9);
  related    1-2 paragraphs of the base page plus other paragraphs: Jaccard in [0.05, 0.5);
  english    an English article (sentences generated from a small grammar) on an English template, `lang="en"`;
  spam       keyword-stuffed repeated lines (激安 ブランド 通販 ...);
  short      one or two sentences.

Every derived page (exact_dup, near_dup, similar, related) has a base `unique` page; a base and all pages
derived from it form a group, and the manifest lists every pair of a group with its exact Jaccard, so by
construction it holds every pair of the crawl with Jaccard >= 0.5 (up to a chance sentence reuse; checked on
10,000 pages). The "at most one shared paragraph" rule needs unused paragraph pairs: with the 1,210 shared
paragraphs it holds up to roughly 40,000 pages; beyond that unrelated bodies start sharing more.
About 3% of the pages are Shift_JIS (HTTP and `<meta>` charset=Shift_JIS; characters outside Shift_JIS
as numeric character references), about 10% of the Japanese pages have no `lang` attribute (but a Japanese
`<title>`). Records are in a shuffled order, so a derived page may come before its base.

WARC: a `warcinfo` record, then per page one `response` record (HTTP/1.1 200 header block with Date, Server,
Content-Type and Content-Length, WARC-Target-URI https://<host>/<path>, WARC-Date, WARC-Record-ID
<urn:uuid:...>, WARC-Warcinfo-ID, WARC-IP-Address, sha1 WARC-Block-Digest and WARC-Payload-Digest, exact
Content-Length), each record its own gzip member. Output is a deterministic function of the inputs and seed.
"""
from __future__ import annotations

import base64
import collections
import dataclasses
import datetime
import gzip
import hashlib
import html
import itertools
import json
import os
import random
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from jpllm_jax.corpus.minhash import ngram_set

KINDS = ("unique", "exact_dup", "near_dup", "similar", "related", "english", "spam", "short")
DERIVED = ("exact_dup", "near_dup", "similar", "related")
DEFAULT_FRACTIONS = {"unique": 0.62, "exact_dup": 0.06, "near_dup": 0.08, "similar": 0.06, "related": 0.04,
                     "english": 0.05, "spam": 0.04, "short": 0.05}
NEAR_RANGE = (0.9, 1.0)  # [lo, hi) Jaccard of near_dup pages to their base.
SIMILAR_RANGE = (0.5, 0.9)
RELATED_RANGE = (0.05, 0.5)
MIN_BODY_CHARS = 450
NGRAM = 5

# ------------------------------------------------------------------------------------- vocabulary
_ROMAJI = ("sakura", "tokyo", "osaka", "kyoto", "nihon", "yume", "hikari", "mirai", "umi", "sora", "hana", "midori",
           "kaze", "tabi", "gourmet", "kurashi", "manabi", "kenko", "okane", "shigoto", "tech", "news", "info",
           "times", "press", "log", "note", "labo", "navi", "portal", "plus", "life", "style", "hiroba", "kotoba")
_TLDS = ("jp", "co.jp", "ne.jp", "or.jp", "com", "net", "info", "jp", "com")
_SUBDOMAINS = ("www.", "", "blog.", "news.", "www.")
_SITE_HEAD = ("さくら", "みらい", "ひかり", "東京", "大阪", "日本", "暮らし", "まなび", "旅", "グルメ", "健康", "マネー",
              "ITトレンド", "歴史", "科学", "地域", "ことば", "せかい")
_SITE_TAIL = ("情報局", "ニュース", "ノート", "ブログ", "通信", "ナビ", "ラボ", "タイムズ", "ジャーナル", "日記",
              "手帖", "ポータル", "ひろば", "まとめ")
_TAGLINES = ("毎日の暮らしに役立つ情報をお届けします", "知りたいことがきっと見つかる", "専門家が分かりやすく解説",
             "最新ニュースと話題のトピック", "学びをもっと身近に")
_NAV = ("ホーム", "ニュース", "コラム", "特集", "ランキング", "レビュー", "暮らし", "エンタメ", "スポーツ", "テクノロジー",
        "ビジネス", "旅行", "グルメ", "お問い合わせ")
_CATEGORIES = (("news", "ニュース"), ("column", "コラム"), ("culture", "文化"), ("history", "歴史"),
               ("science", "科学"), ("life", "暮らし"), ("travel", "旅行"), ("tech", "テクノロジー"),
               ("sports", "スポーツ"), ("economy", "経済"))
_ADS = ("【PR】今なら送料無料！人気商品ランキング", "【広告】話題のスキンケアを初回限定価格で", "資料請求はこちらから",
        "【PR】転職するなら今がチャンス！無料登録", "期間限定セール開催中　最大50%オフ", "スポンサーリンク")
_FOOTER_LINKS = (("company", "会社概要"), ("privacy", "プライバシーポリシー"), ("terms", "利用規約"),
                 ("contact", "お問い合わせ"), ("sitemap", "サイトマップ"), ("ad", "広告掲載について"))
_NEAR_PHRASES = ("（編集部）", "※この記事は更新されました。", "詳しくは公式サイトをご覧ください。", "（写真はイメージです）",
                 "【追記あり】", "（敬称略）", "関連記事もあわせてご覧ください。")
_SPAM_WORDS = ("激安", "最安値", "送料無料", "即日発送", "ブランド", "バッグ", "財布", "腕時計", "スーパーコピー", "人気",
               "新作", "通販", "格安", "正規品", "保証", "口コミ", "ランキング", "比較", "返金保証", "副業", "簡単に稼げる",
               "無料", "今すぐ", "限定", "セール", "アウトレット", "レディース", "メンズ", "スニーカー", "ダイエット",
               "サプリ", "脱毛", "クーポン", "ポイント還元", "お得", "高収入", "在宅ワーク", "即金", "激安通販", "本物",
               "大特価", "最大90%オフ", "おすすめ", "売れ筋", "楽天", "代引き", "ジュエリー", "香水", "コスメ", "美白",
               "キャッシング", "審査なし", "FX", "仮想通貨", "必勝法", "パチンコ", "攻略", "出会い", "無料登録", "公式")
_EN_NOUNS = """committee resident library council bakery museum volunteer railway student festival engineer orchestra
farmer hospital artist teacher mayor harbor bridge river garden market school village district museum theater
company bank factory bakery island mountain forest valley station airport highway tunnel stadium park castle temple
journalist scientist doctor nurse driver pilot chef gardener writer painter musician athlete coach lawyer judge
report survey budget plan program schedule exhibition concert lecture study project proposal policy contract
election debate meeting ceremony parade workshop conference season harvest storm flood drought earthquake fire
map letter photograph record archive collection painting sculpture manuscript novel poem song film album recipe
bicycle ferry train bus truck tractor boat engine machine computer network website database software camera
coffee bread cheese apple rice soup wine tea honey salt pepper lemon orange tomato potato onion garlic mushroom
neighbor visitor tourist customer client family child parent grandmother stranger friend colleague partner
crowd""".split()
_EN_ADJECTIVES = """new old small large quiet busy ancient modern local national famous unknown careful generous
ambitious modest bright dark early late cheap expensive rare common simple complex narrow wide green golden
northern southern eastern western rural urban public private annual weekly sudden gradual cautious bold strange
familiar wooden stone colorful gentle noisy patient remarkable ordinary temporary permanent historic popular""".split()
_EN_VERBS = """announced discussed celebrated reviewed introduced described questioned supported planned opened
examined improved criticized documented welcomed postponed rebuilt painted borrowed repaired measured collected
delivered organized cancelled approved rejected designed tested visited explored photographed recorded translated
published restored replaced ordered cooked shared sold bought carried protected cleaned moved returned followed
compared predicted explained ignored praised expanded reduced financed inspected celebrated invented""".split()
_EN_PREPS = "near behind beside above below across along around beyond inside outside under over through".split()
_EN_ADVERBS = """quickly slowly carefully quietly suddenly finally eventually recently openly rarely proudly
briefly patiently reluctantly eagerly politely firmly gently loudly seriously""".split()
_EN_TIMES = ("on Monday", "on Tuesday", "on Friday", "last week", "last month", "earlier this year", "in the spring",
             "in the autumn", "after the holidays", "before dawn", "late in the evening", "over the weekend")
_EN_LINKS = ("Meanwhile,", "However,", "In addition,", "As a result,", "Later,", "According to officials,",
             "At the same time,", "For now,", "Surprisingly,", "Some weeks later,")
_EN_TITLES = ("Community News", "City Notes", "Weekly Review", "Local Report", "Morning Digest", "Town Journal")


# ---------------------------------------------------------------------------------------- plan
@dataclasses.dataclass
class _Site:
  host: str
  name: str
  layout: int
  server: str
  categories: tuple[tuple[str, str], ...]
  titles: list[str] = dataclasses.field(default_factory=list)  # for the sidebar's 人気記事.


@dataclasses.dataclass
class _Page:
  kind: str
  body: list[str]
  title: str
  site: _Site | None = None
  url: str = ""
  group: int | None = None
  base: int | None = None  # index of the base page (derived kinds).
  charset: str = "utf-8"
  lang: str | None = "ja"
  date: datetime.datetime | None = None
  record_id: str = ""


def _split_sentences(text: str) -> list[str]:
  return [s for s in re.split(r"(?<=[。！？])", text) if s.strip()]


def _body_text(body: Sequence[str]) -> str:
  return "\n".join(body)


def _jaccard_sets(a: set[str], b: set[str]) -> float:
  if not a and not b:
    return 1.0
  return len(a & b) / len(a | b)


class _Generator:
  """Plans the pages (bodies, kinds, groups), then renders them."""

  def __init__(self, paragraphs: Sequence[str], seed: int, fractions: Mapping[str, float]):
    self.rng = random.Random(seed)
    seen, pool = set(), []
    for p in paragraphs:
      for line in str(p).split("\n"):
        line = line.strip()
        if line and line not in seen:
          seen.add(line)
          pool.append(line)
    self.long = [p for p in pool if len(p) >= 30]
    if len(self.long) < 20:
      raise ValueError(f"need at least 20 paragraphs of >= 30 characters, got {len(self.long)}")
    self.sentences = sorted({s for p in pool for s in _split_sentences(p) if 8 <= len(s) <= 150})
    self.chars = sorted({c for p in self.long for c in p if "\u3040" <= c <= "\u30ff" or "\u4e00" <= c <= "\u9fff"})
    self.fractions = fractions
    self.used_pairs: set[tuple[int, int]] = set()
    self.used_short: set[str] = set()
    self.urls: set[str] = set()
    self.hosts: set[str] = set()

  # ---------------------------------------------------------------------------------- bodies
  def _pairs(self, ids: Sequence[int]) -> set[tuple[int, int]]:
    return {(min(a, b), max(a, b)) for a, b in itertools.combinations(ids, 2)}

  def _compose(self, k_range=(3, 8), keep: Sequence[int] = (), min_chars: int = MIN_BODY_CHARS,
               tries: int = 200, register: bool = True) -> list[int]:
    """Paragraph ids (the `keep` ones first, then shuffled) of >= `min_chars` characters, none over 40% of
    them, whose paragraph pairs (other than those among `keep`) were never used together; `register` marks
    its pairs used. After `tries` failures the last candidate is taken anyway."""
    rng, n = self.rng, len(self.long)
    allowed = self._pairs(keep)
    ids: list[int] = []
    for _ in range(tries):
      k = rng.randint(*k_range)
      ids = list(keep)
      while len(ids) < k or (sum(len(self.long[i]) for i in ids) < min_chars and len(ids) < 8):
        i = rng.randrange(n)
        if i not in ids:
          ids.append(i)
      lengths = [len(self.long[i]) for i in ids]
      if sum(lengths) < min_chars or max(lengths) > 0.4 * sum(lengths):
        continue
      if (self._pairs(ids) - allowed) & self.used_pairs:
        continue
      break
    if register:
      self.used_pairs |= self._pairs(ids)
    order = ids[len(keep):]
    rng.shuffle(order)
    return list(keep) + order

  def _edit(self, base: list[str], lo: float, target: float, ops, max_steps: int = 400,
            start: list[str] | None = None) -> tuple[list[str], float]:
    """Applies random `ops` to `start` (default `base`) until its Jaccard to `base` is <= target, never going
    below `lo`; returns the body and its Jaccard to `base`."""
    base_set = ngram_set(_body_text(base), NGRAM)
    cur = list(base if start is None else start)
    j = _jaccard_sets(base_set, ngram_set(_body_text(cur), NGRAM))
    for _ in range(max_steps):
      cand = self.rng.choice(ops)(cur)
      if cand is None:
        continue
      jc = _jaccard_sets(base_set, ngram_set(_body_text(cand), NGRAM))
      if jc < lo:
        continue
      cur, j = cand, jc
      if j <= target:
        break
    return cur, j

  def _op_chars(self, body: list[str]) -> list[str] | None:
    i = self.rng.randrange(len(body))
    p = body[i]
    if len(p) < 10:
      return None
    pos = self.rng.randrange(len(p) - 2)
    k = self.rng.randint(1, 2)
    new = "".join(self.rng.choice(self.chars) for _ in range(k))
    return body[:i] + [p[:pos] + new + p[pos + k:]] + body[i + 1:]

  def _op_phrase(self, body: list[str]) -> list[str]:
    i = self.rng.randrange(len(body))
    phrase = self.rng.choice(_NEAR_PHRASES)
    p = body[i] + phrase if self.rng.random() < 0.7 else phrase + body[i]
    return body[:i] + [p] + body[i + 1:]

  def _op_punct(self, body: list[str]) -> list[str] | None:
    i = self.rng.randrange(len(body))
    p = body[i]
    spots = [m.start() for m in re.finditer("[、。]", p)]
    if not spots:
      return None
    pos = self.rng.choice(spots)
    return body[:i] + [p[:pos] + {"、": "，", "。": "．"}[p[pos]] + p[pos + 1:]] + body[i + 1:]

  def _sentence_op(self, body: list[str], mode: str) -> list[str] | None:
    i = self.rng.randrange(len(body))
    sents = _split_sentences(body[i])
    s = self.rng.randrange(len(sents))
    if mode == "delete":
      if len(sents) < 2:
        return None
      del sents[s]
    elif mode == "replace":
      sents[s] = self.rng.choice(self.sentences)
    else:
      sents.insert(s, self.rng.choice(self.sentences))
    return body[:i] + ["".join(sents)] + body[i + 1:]

  def near_dup(self, base: list[str]) -> tuple[list[str], float] | None:
    ops = [self._op_chars, self._op_chars, self._op_punct, self._op_phrase,
           lambda b: self._sentence_op(b, "delete"), lambda b: self._sentence_op(b, "replace")]
    target = self.rng.uniform(0.905, 0.985)
    body, j = self._edit(base, NEAR_RANGE[0], target, ops)
    for _ in range(5):  # only if hundreds of edits changed nothing (a body of repeated text).
      if j < NEAR_RANGE[1]:
        return body, j
      body, j = self._edit(base, NEAR_RANGE[0], target, [self._op_chars], start=body)
    return None

  def similar(self, base: list[str]) -> tuple[list[str], float] | None:
    ops = [lambda b: self._sentence_op(b, "replace"), lambda b: self._sentence_op(b, "insert"),
           lambda b: self._sentence_op(b, "delete"), self._op_chars]
    target = self.rng.uniform(0.55, 0.87)
    body, j = self._edit(base, SIMILAR_RANGE[0], target, ops)
    return (body, j) if SIMILAR_RANGE[0] <= j < SIMILAR_RANGE[1] else None

  def related(self, base_ids: list[int]) -> tuple[list[str], float] | None:
    base_set = ngram_set(_body_text([self.long[i] for i in base_ids]), NGRAM)
    for _ in range(20):
      keep = self.rng.sample(base_ids, self.rng.randint(1, min(2, len(base_ids) - 1)))
      ids = self._compose((len(keep) + 2, len(keep) + 5), keep=keep, tries=50, register=False)
      body = [self.long[i] for i in ids]
      j = _jaccard_sets(base_set, ngram_set(_body_text(body), NGRAM))
      if RELATED_RANGE[0] <= j < RELATED_RANGE[1]:
        self.used_pairs |= self._pairs(ids)
        return body, j
    return None

  def short(self) -> list[str]:
    """One or two sentences (<= 200 characters), none used by another short page while unused ones are
    easy to find; after that, a new pair of sentences."""
    for attempt in range(1000):
      sents = self.rng.sample(self.sentences, self.rng.randint(1, 2) if attempt < 100 else 2)
      text = "".join(sents)
      if len(text) > 200 or text in self.used_short:
        continue
      if attempt < 100 and any(s in self.used_short for s in sents):
        continue
      self.used_short.update(sents)
      self.used_short.add(text)
      return [text]
    return [self.rng.choice(self.sentences)]

  def spam(self) -> list[str]:
    rng = self.rng
    words = rng.sample(_SPAM_WORDS, rng.randint(6, 10))
    item = rng.choice(("バッグ", "財布", "時計", "スニーカー", "サプリ", "コスメ", "副業"))
    lines = []
    for _ in range(rng.randint(25, 60)):
      picked = rng.sample(words, rng.randint(3, 5))
      price = f"¥{rng.randint(1, 99)},{rng.randint(0, 999):03d}"
      lines.append(f"{item} " + " ".join(picked) + (f" {price}" if rng.random() < 0.4 else "") + "！")
    return lines

  def _en_phrase(self) -> str:
    rng = self.rng
    adj = rng.choice(_EN_ADJECTIVES) + " " if rng.random() < 0.6 else ""
    return f"{rng.choice(('the', 'a', 'their', 'one', 'our', 'every', 'that'))} {adj}{rng.choice(_EN_NOUNS)}"

  def _en_sentence(self) -> str:
    rng = self.rng
    words = [self._en_phrase(), rng.choice(_EN_VERBS), self._en_phrase()]
    if rng.random() < 0.4:
      words.insert(1, rng.choice(_EN_ADVERBS))
    if rng.random() < 0.6:
      words += [rng.choice(_EN_PREPS), self._en_phrase()]
    if rng.random() < 0.4:
      words.append(rng.choice(_EN_TIMES))
    if rng.random() < 0.25:
      words.insert(0, rng.choice(_EN_LINKS))
    text = " ".join(words) + "."
    return text[0].upper() + text[1:]

  def english(self) -> list[str]:
    return [" ".join(self._en_sentence() for _ in range(self.rng.randint(3, 6)))
            for _ in range(self.rng.randint(3, 6))]

  # ---------------------------------------------------------------------------------- sites, urls
  def site(self) -> _Site:
    rng = self.rng
    while True:
      host = f"{rng.choice(_SUBDOMAINS)}{rng.choice(_ROMAJI)}-{rng.choice(_ROMAJI)}.{rng.choice(_TLDS)}"
      if host not in self.hosts:
        self.hosts.add(host)
        break
    name = rng.choice(_SITE_HEAD) + rng.choice(_SITE_TAIL)
    server = rng.choice(("nginx", "Apache/2.4.57 (Unix)", "cloudflare", "nginx/1.24.0", "Microsoft-IIS/10.0"))
    return _Site(host, name, rng.randrange(4), server, tuple(rng.sample(_CATEGORIES, 5)))

  def url(self, site: _Site, date: datetime.datetime) -> str:
    rng = self.rng
    while True:
      style = rng.randrange(5)
      cat = rng.choice(site.categories)[0]
      if style == 0:
        path = f"{cat}/{date:%Y/%m}/{rng.randrange(10**6):06d}.html"
      elif style == 1:
        path = f"archives/{rng.randrange(1, 10**5)}"
      elif style == 2:
        path = f"entry/{date:%Y/%m/%d/%H%M%S}"
      elif style == 3:
        path = f"blog-entry-{rng.randrange(1, 5000)}.html"
      else:
        path = f"{cat}/article/{rng.randrange(10**8):08x}/"
      url = f"https://{site.host}/{path}"
      if url not in self.urls:
        self.urls.add(url)
        return url


def _title(body: Sequence[str]) -> str:
  head = _split_sentences(body[0])[0] if body and body[0] else "お知らせ"
  for stop in ("は、", "は", "（", "、"):
    k = head.find(stop)
    if 2 <= k <= 24:
      return head[:k]
  return head[:16].rstrip("。")


def _counts(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
  """Largest-remainder split of n over the kinds; every kind with a share > 0 gets >= 1 page when n allows."""
  unknown = set(fractions) - set(KINDS)
  if unknown:
    raise ValueError(f"unknown page kinds {sorted(unknown)}; known: {KINDS}")
  total = sum(fractions.values())
  if total <= 0 or any(v < 0 for v in fractions.values()):
    raise ValueError(f"fractions must be >= 0 with a positive sum, got {dict(fractions)}")
  raw = {k: n * fractions.get(k, 0.0) / total for k in KINDS}
  counts = {k: int(v) for k, v in raw.items()}
  for k in sorted(KINDS, key=lambda k: counts[k] - raw[k])[: n - sum(counts.values())]:
    counts[k] += 1
  for k in KINDS:  # make sure each requested kind appears (taken from the largest kind).
    if fractions.get(k, 0) > 0 and counts[k] == 0 and n >= 2 * len(KINDS):
      big = max(counts, key=counts.get)
      counts[big] -= 1
      counts[k] += 1
  if any(counts[k] for k in DERIVED) and counts["unique"] == 0:
    raise ValueError("derived pages need at least one unique page")
  return counts


def _plan(paragraphs: Sequence[str], n_pages: int, seed: int, fractions: Mapping[str, float] | None,
          sjis_fraction: float, nolang_fraction: float) -> tuple[list[_Page], list[dict[str, Any]]]:
  gen = _Generator(paragraphs, seed, DEFAULT_FRACTIONS if fractions is None else fractions)
  rng = gen.rng
  counts = _counts(n_pages, gen.fractions)
  sites = [gen.site() for _ in range(max(3, n_pages // 25))]
  en_sites = [gen.site() for _ in range(max(1, counts["english"] // 10))]
  pages: list[_Page] = []
  base_ids: list[list[int]] = []  # paragraph ids of each unique page (by its index in `pages`).
  for _ in range(counts["unique"]):
    ids = gen._compose()
    body = [gen.long[i] for i in ids]
    pages.append(_Page("unique", body, _title(body), rng.choice(sites)))
    base_ids.append(ids)
  n_unique = len(pages)
  groups: dict[int, list[int]] = collections.defaultdict(list)
  for kind in DERIVED:
    for _ in range(counts[kind]):
      for _attempt in range(10):
        b = rng.randrange(n_unique)
        base = pages[b]
        if kind == "exact_dup":
          made = (list(base.body), 1.0)
        elif kind == "near_dup":
          made = gen.near_dup(base.body)
        elif kind == "similar":
          made = gen.similar(base.body)
        else:
          made = gen.related(base_ids[b])
        if made is not None:
          break
      if made is None:  # could not plant this kind (tiny pool): an extra unique page instead.
        body = [gen.long[i] for i in gen._compose()]
        pages.append(_Page("unique", body, _title(body), rng.choice(sites)))
        continue
      body = made[0]
      site = rng.choice([s for s in sites if s is not base.site] or sites)
      title = base.title if kind != "related" else _title(body)
      if rng.random() < 0.3:
        title = rng.choice(("【転載】", "【話題】", "【まとめ】", "")) + title
      pages.append(_Page(kind, body, title, site, base=b))
      groups[b].append(len(pages) - 1)
  for _ in range(counts["english"]):
    body = gen.english()
    title = rng.choice(_EN_TITLES) + ": " + " ".join(body[0].split(" ")[:4]).title()
    pages.append(_Page("english", body, title, rng.choice(en_sites), lang="en"))
  for _ in range(counts["spam"]):
    body = gen.spam()
    pages.append(_Page("spam", body, "【" + "】【".join(body[0].split(" ")[1:4]) + "】激安通販", rng.choice(sites)))
  for _ in range(counts["short"]):
    body = gen.short()
    pages.append(_Page("short", body, _title(body), rng.choice(sites)))

  # Sites, charsets, dates, urls; then the record order.
  start = datetime.datetime(2024, 4, 1, tzinfo=datetime.timezone.utc)
  japanese = [i for i, p in enumerate(pages) if p.lang == "ja"]
  n_sjis = round(sjis_fraction * len(japanese))
  if sjis_fraction > 0 and len(japanese) >= 10:
    n_sjis = max(n_sjis, 1)
  sjis = set(rng.sample(japanese, min(n_sjis, len(japanese))))
  nolang = set(rng.sample(japanese, min(round(nolang_fraction * len(japanese)), len(japanese))))
  for i, p in enumerate(pages):
    p.date = start + datetime.timedelta(seconds=rng.randrange(60 * 86400))
    p.url = gen.url(p.site, p.date)
    p.record_id = f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}>"
    if p.lang == "ja":
      p.charset = "Shift_JIS" if i in sjis else "utf-8"
      if i in nolang:
        p.lang = None
    p.site.titles.append(p.title)
  group_of = {}
  for g, (b, members) in enumerate(sorted(groups.items())):
    for i in [b] + members:
      group_of[i] = g
  for i, p in enumerate(pages):
    p.group = group_of.get(i)
  pairs = []
  for b, members in sorted(groups.items()):
    ids = [b] + members
    sets = {i: ngram_set(_body_text(pages[i].body), NGRAM) for i in ids}
    for x, y in itertools.combinations(ids, 2):
      pairs.append({"url_a": pages[x].url, "url_b": pages[y].url, "jaccard": _jaccard_sets(sets[x], sets[y]),
                    "kinds": [pages[x].kind, pages[y].kind], "group": group_of[b]})
  rng.shuffle(pages)
  return pages, pairs


# ------------------------------------------------------------------------------------- rendering
def _e(s: str) -> str:
  return html.escape(s, quote=False)


def _render(page: _Page, rng: random.Random) -> str:
  site = page.site
  assert site is not None
  english = page.lang == "en"
  lang_attr = f' lang="{page.lang}"' if page.lang else ""
  meta = '<meta charset="Shift_JIS">' if page.charset == "Shift_JIS" else '<meta charset="utf-8">'
  cats = site.categories
  cat_en, cat_ja = rng.choice(cats)
  if english:
    nav_items = [("/", "Home"), ("/news/", "News"), ("/events/", "Events"), ("/about/", "About"),
                 ("/contact/", "Contact")]
    foot = ('<footer class="site-footer"><ul><li><a href="/about/">About us</a></li><li><a href="/privacy/">'
            f'Privacy Policy</a></li></ul><p>Copyright &copy; {page.date:%Y} {_e(site.host)}. All rights reserved.'
            '</p></footer>')
    side = ('<aside class="sidebar"><div class="widget"><h3>Latest posts</h3><ul>'
            + "".join(f'<li><a href="/p/{rng.randrange(9999)}">{_e(t)}</a></li>' for t in rng.sample(_EN_TITLES, 3))
            + '</ul></div><div class="ad">Advertisement</div></aside>')
    site_name = site.host
  else:
    nav_items = [("/", "ホーム")] + [(f"/{c}/", j) for c, j in cats] + [("/contact/", "お問い合わせ")]
    links = rng.sample(_FOOTER_LINKS, 4)
    foot = ('<footer class="site-footer"><ul class="footer-links">'
            + "".join(f'<li><a href="/{u}/">{t}</a></li>' for u, t in links)
            + f'</ul><p class="copyright">Copyright © {page.date.year - rng.randrange(5)}-{page.date.year} '
            f'{_e(site.name)} All Rights Reserved.</p></footer>')
    popular = rng.sample(site.titles, min(5, len(site.titles)))
    ad = rng.choice(_ADS)
    side = ('<aside class="sidebar"><div class="widget ad"><a href="https://ad.doubleclick.example/click?id='
            f'{rng.randrange(10**6)}" rel="sponsored"><img src="/img/ad{rng.randrange(9)}.png" alt="広告"></a>'
            f'<p>{_e(ad)}</p></div><div class="widget popular"><h3>人気記事</h3><ul>'
            + "".join(f'<li><a href="/archives/{rng.randrange(1, 10**5)}">{_e(t)}</a></li>' for t in popular)
            + '</ul></div><div class="widget"><h3>カテゴリー</h3><ul>'
            + "".join(f'<li><a href="/{c}/">{j}</a></li>' for c, j in cats) + "</ul></div></aside>")
    site_name = site.name
  nav = ('<nav class="global-nav"><ul>' + "".join(f'<li><a href="{u}">{t}</a></li>' for u, t in nav_items)
         + "</ul></nav>")
  date_text = f"{page.date:%Y-%m-%d}" if english else f"{page.date.year}年{page.date.month}月{page.date.day}日"
  paragraphs = "\n".join(f"<p>{_e(p)}</p>" for p in page.body)
  article = (f'<article class="entry"><h1 class="entry-title">{_e(page.title)}</h1>\n'
             f'<div class="entry-meta"><time datetime="{page.date:%Y-%m-%d}">{date_text}</time></div>\n'
             f'<div class="entry-content">\n{paragraphs}\n</div>\n'
             + ('<div class="share">Share: <a href="#">Twitter</a> <a href="#">Facebook</a></div>' if english else
                '<div class="share">この記事をシェアする：<a href="#">X</a> <a href="#">Facebook</a> '
                '<a href="#">LINE</a> <a href="#">はてブ</a></div>') + "</article>")
  header = (f'<header class="site-header"><div class="logo"><a href="/">{_e(site_name)}</a></div>'
            + ("" if english else f'<p class="tagline">{rng.choice(_TAGLINES)}</p>') + "</header>")
  crumbs = ("" if english else f'<div class="breadcrumb"><a href="/">ホーム</a> &gt; <a href="/{cat_en}/">{cat_ja}'
            f'</a> &gt; {_e(page.title)}</div>')
  head = (f'<!DOCTYPE html>\n<html{lang_attr}>\n<head>\n{meta}\n<title>{_e(page.title)} | {_e(site_name)}</title>\n'
          '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
          f'<link rel="stylesheet" href="/css/style{site.layout}.css">\n<script async src="https://www.googletagmanager'
          '.example/gtag/js?id=G-XXXX"></script>\n<script>window.dataLayer = window.dataLayer || [];</script>\n'
          '</head>\n')
  if site.layout == 0:
    body = f"{header}\n{nav}\n{crumbs}\n<main>\n{article}\n</main>\n{side}\n{foot}"
  elif site.layout == 1:
    body = (f'<div id="wrapper">{header}\n{nav}\n<div id="container"><div id="content">{crumbs}\n{article}</div>\n'
            f"{side}</div>\n{foot}</div>")
  elif site.layout == 2:
    body = f'{header}\n<div class="layout">{side}\n<div class="main">{nav}\n{article}</div></div>\n{foot}'
  else:
    comments = ("" if english else '<section class="comments"><h2>コメント</h2><p>この記事へのコメントはまだありません。'
                "</p></section>")
    body = f"{nav}\n{header}\n<main>{crumbs}\n{article}\n{comments}</main>\n{side}\n{foot}"
  return f"{head}<body>\n{body}\n</body>\n</html>\n"


# ---------------------------------------------------------------------------------------- WARC
def _digest(data: bytes) -> str:
  return "sha1:" + base64.b32encode(hashlib.sha1(data).digest()).decode()


def _warc_record(headers: list[tuple[str, str]], block: bytes) -> bytes:
  head = "WARC/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
  head += f"Content-Length: {len(block)}\r\n\r\n"
  return gzip.compress(head.encode("utf-8") + block + b"\r\n\r\n", compresslevel=6, mtime=0)


def _warcinfo(filename: str, record_id: str, date: datetime.datetime, n_pages: int, seed: int) -> bytes:
  fields = (f"software: benchmarks.synthetic_crawl\r\nformat: WARC File Format 1.0\r\n"
            f"description: synthetic Japanese crawl, {n_pages} pages, seed {seed}\r\n"
            "isPartOf: jpllm-synthetic-crawl\r\nrobots: classic\r\n").encode("utf-8")
  return _warc_record([("WARC-Type", "warcinfo"), ("WARC-Record-ID", record_id),
                       ("WARC-Date", f"{date:%Y-%m-%dT%H:%M:%SZ}"), ("WARC-Filename", filename),
                       ("Content-Type", "application/warc-fields")], fields)


def _response(page: _Page, html_text: str, warcinfo_id: str, rng: random.Random) -> bytes:
  payload = html_text.encode("shift_jis" if page.charset == "Shift_JIS" else "utf-8", errors="xmlcharrefreplace")
  http = (f"HTTP/1.1 200 OK\r\nDate: {page.date:%a, %d %b %Y %H:%M:%S} GMT\r\nServer: {page.site.server}\r\n"
          f"Content-Type: text/html; charset={page.charset}\r\nContent-Length: {len(payload)}\r\n"
          "Connection: close\r\n\r\n").encode("ascii")
  block = http + payload
  ip = f"{rng.choice(('192.0.2', '198.51.100', '203.0.113'))}.{rng.randrange(1, 255)}"
  return _warc_record([("WARC-Type", "response"), ("WARC-Record-ID", page.record_id),
                       ("WARC-Warcinfo-ID", warcinfo_id), ("WARC-Date", f"{page.date:%Y-%m-%dT%H:%M:%SZ}"),
                       ("WARC-Target-URI", page.url), ("WARC-IP-Address", ip),
                       ("WARC-Block-Digest", _digest(block)), ("WARC-Payload-Digest", _digest(payload)),
                       ("Content-Type", "application/http; msgtype=response")], block)


def _write(pages: Sequence[_Page], path: str, seed: int, shard: int, rng: random.Random) -> list[dict[str, Any]]:
  """Writes one WARC file (atomically); returns the manifest entries of its pages."""
  warcinfo_id = f"<urn:uuid:{uuid.UUID(int=rng.getrandbits(128), version=4)}>"
  date = min((p.date for p in pages), default=datetime.datetime(2024, 4, 1, tzinfo=datetime.timezone.utc))
  entries = []
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(_warcinfo(os.path.basename(path), warcinfo_id, date, len(pages), seed))
    for r, p in enumerate(pages):
      f.write(_response(p, _render(p, rng), warcinfo_id, rng))
      entries.append({"url": p.url, "kind": p.kind, "host": p.site.host, "record_id": p.record_id,
                      "shard": shard, "record": r, "group": p.group, "charset": p.charset, "lang": p.lang,
                      "title": p.title, "body_chars": len(_body_text(p.body))})
  os.replace(tmp, path)
  return entries


def _manifest(pages: list[dict[str, Any]], pairs: list[dict[str, Any]], files: list[str], n_pages: int,
              seed: int) -> dict[str, Any]:
  counts = collections.Counter(p["kind"] for p in pages)
  return {"generator": "benchmarks.synthetic_crawl", "seed": seed, "n_pages": n_pages, "ngram": NGRAM,
          "body": "article paragraphs joined by newlines", "files": files,
          "counts": {k: counts.get(k, 0) for k in KINDS}, "pages": pages, "pairs": pairs}


def make_crawl_shards(paragraphs: Sequence[str], n_pages: int, out_dir: str, shards: int = 1, seed: int = 0, *,
                      fractions: Mapping[str, float] | None = None, sjis_fraction: float = 0.03,
                      nolang_fraction: float = 0.1) -> dict[str, Any]:
  """Generates `n_pages` pages into `out_dir/00000.warc.gz`, `00001.warc.gz`, ... (`shards` files, each with
  its own warcinfo record; planted pairs cross files) and `out_dir/manifest.json`; returns the manifest:
  `pages` (url, kind, host, record_id, shard, record, group, charset, lang, title, body_chars), `pairs`
  (url_a, url_b, exact body Jaccard, kinds, group: every pair within a planted group) and `counts` by kind."""
  if n_pages < 1 or shards < 1:
    raise ValueError(f"need n_pages >= 1 and shards >= 1, got {n_pages}, {shards}")
  pages, pairs = _plan(paragraphs, n_pages, seed, fractions, sjis_fraction, nolang_fraction)
  os.makedirs(out_dir, exist_ok=True)
  rng = random.Random(seed * 7919 + 1)
  entries, files = [], []
  for s in range(shards):
    chunk = pages[s * len(pages) // shards:(s + 1) * len(pages) // shards]
    path = os.path.join(out_dir, f"{s:05d}.warc.gz")
    entries += _write(chunk, path, seed, s, rng)
    files.append(os.path.basename(path))
  manifest = _manifest(entries, pairs, files, n_pages, seed)
  with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
    json.dump(manifest, f, ensure_ascii=False, indent=1)
  return manifest


def make_crawl(paragraphs: Sequence[str], n_pages: int, path: str, seed: int = 0, *,
               fractions: Mapping[str, float] | None = None, sjis_fraction: float = 0.03,
               nolang_fraction: float = 0.1) -> dict[str, Any]:
  """Generates `n_pages` pages into the single WARC file `path` (`.warc.gz`) and the manifest next to it
  (`<path without .warc.gz>.manifest.json`); returns the manifest (see `make_crawl_shards`)."""
  if n_pages < 1:
    raise ValueError(f"need n_pages >= 1, got {n_pages}")
  pages, pairs = _plan(paragraphs, n_pages, seed, fractions, sjis_fraction, nolang_fraction)
  d = os.path.dirname(os.path.abspath(path))
  os.makedirs(d, exist_ok=True)
  entries = _write(pages, path, seed, 0, random.Random(seed * 7919 + 1))
  manifest = _manifest(entries, pairs, [os.path.basename(path)], n_pages, seed)
  stem = path[: -len(".warc.gz")] if path.endswith(".warc.gz") else path
  with open(stem + ".manifest.json", "w", encoding="utf-8") as f:
    json.dump(manifest, f, ensure_ascii=False, indent=1)
  return manifest


def body_texts_from_html(html_text: str) -> str:
  """The BODY text of a generated page (its article paragraphs, unescaped, joined by newlines): the text the
  manifest's Jaccards are computed on. Only meant for pages of this generator."""
  m = re.search(r'<div class="entry-content">(.*?)</div>', html_text, re.S)
  if not m:
    return ""
  return "\n".join(html.unescape(p) for p in re.findall(r"<p>(.*?)</p>", m.group(1), re.S))


if __name__ == "__main__":  # python -m benchmarks.synthetic_crawl PARAGRAPHS.jsonl N OUT_DIR [SHARDS]
  import sys
  src, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
  with open(src, encoding="utf-8") as fh:
    texts = [json.loads(line)["text"] for line in fh]
  t0 = time.perf_counter()
  m = make_crawl_shards(texts, n, out, int(sys.argv[4]) if len(sys.argv) > 4 else 1)
  print(json.dumps({"pages": n, "seconds": round(time.perf_counter() - t0, 2), "counts": m["counts"],
                    "pairs": len(m["pairs"])}))
