"""Tests of the NG-word and host filters and of the normalisation (punctuation style, footer removal)."""
from __future__ import annotations

import pytest

from jpllm_jax.corpus.ngwords import HostFilter, NgWords, normalize_host
from jpllm_jax.corpus.normalize import NormalizeConfig, normalize, normalize_punctuation, remove_footer

# --- NG words ---------------------------------------------------------------------------------------------------


def test_ng_words_leftmost_longest_non_overlapping():
  ng = NgWords(["悪い", "悪い言葉", "言葉遣い", "ab"])
  assert ng.matches("これは悪い言葉遣いです") == [(3, "悪い言葉")]  # longest at the leftmost start; 言葉遣い overlaps
  assert ng.matches("悪いのは悪い言葉") == [(0, "悪い"), (4, "悪い言葉")]
  assert ng.matches("ABab") == [(2, "ab")]  # case-sensitive
  # 4 matched characters of 9 Japanese letters (です, これは, 悪い言葉 = 2 + 3 + 4; "!" is not a letter).
  assert ng.ng_fraction("これは悪い言葉です!") == pytest.approx(4 / 9)
  assert ng.ng_fraction("何もない") == 0.0
  assert ng.ng_fraction("ab ab") == 0.0  # matches but no Japanese letters


def test_ng_words_threshold():
  ng = NgWords(["死ね"])
  clean = "あ" * 38
  assert ng.ng_fraction(clean + "死ね") == pytest.approx(2 / 40)
  assert ng.reject_reason(clean + "死ね") == "ng_words"  # 0.05 >= 0.05
  assert ng.reject_reason("あ" * 39 + "死ね") is None  # 2 / 41 < 0.05
  assert ng.reject_reason(clean + "死ね", threshold=0.06) is None
  assert NgWords([]).reject_reason("死ね") is None and NgWords([]).ng_fraction("死ね") == 0.0


def test_ng_words_from_file(tmp_path):
  path = tmp_path / "ng.txt"
  path.write_text("# コメント\n\n  ばか  \nあほ\n#あいう\n", encoding="utf-8")
  ng = NgWords.from_file(path)
  assert ng.words == ["あほ", "ばか"]
  assert ng.matches("ばかあほあいう") == [(0, "ばか"), (2, "あほ")]


# --- hosts ------------------------------------------------------------------------------------------------------


def test_normalize_host():
  assert normalize_host(" WWW.Example.COM.:8080 ") == "www.example.com"
  assert normalize_host("[::1]:443") == "::1"
  assert normalize_host("1.2.3.4:80") == "1.2.3.4"


def test_host_suffix_label_boundary():
  hosts = HostFilter(suffixes=["example.com", ".xxx", "adult"])
  assert hosts.reject_reason("example.com") == "host_suffix"
  assert hosts.reject_reason("a.b.Example.com.") == "host_suffix"
  assert hosts.reject_reason("badexample.com") is None
  assert hosts.reject_reason("example.com.jp") is None
  assert hosts.reject_reason("site.xxx:80") == "host_suffix"
  assert hosts.reject_reason("sitexxx") is None
  assert hosts.reject_reason("foo.adult") == "host_suffix"
  assert hosts.reject_reason("") is None


def test_host_blocklist_parents_and_categories():
  hosts = HostFilter(blocked_hosts={"bad.jp": "adult", "x.example.org": "gambling"})
  assert hosts.reject_reason("bad.jp") == "host_blocklist:adult"
  assert hosts.reject_reason("www.BAD.jp") == "host_blocklist:adult"
  assert hosts.reject_reason("notbad.jp") is None
  assert hosts.reject_reason("example.org") is None
  assert hosts.reject_reason("a.x.example.org") == "host_blocklist:gambling"
  assert HostFilter(blocked_hosts=["evil.com"]).reject_reason("evil.com") == "host_blocklist:custom"
  both = HostFilter(suffixes=["jp"], blocked_hosts={"bad.jp": "adult"})
  assert both.reject_reason("bad.jp") == "host_suffix"  # suffixes are checked first


def test_host_filter_from_ut1(tmp_path):
  for category, domains in {"adult": "# comment\nporn.example\n\nsex.example.net\n",
                            "gambling": "casino.example\nsex.example.net\n",
                            "news": "news.example\n"}.items():
    (tmp_path / category).mkdir()
    (tmp_path / category / "domains").write_text(domains, encoding="utf-8")
  (tmp_path / "README").write_text("not a category", encoding="utf-8")
  hosts = HostFilter.from_ut1(tmp_path, categories=["adult", "gambling"])
  assert hosts.reject_reason("www.porn.example") == "host_blocklist:adult"
  assert hosts.reject_reason("casino.example") == "host_blocklist:gambling"
  assert hosts.reject_reason("sex.example.net") == "host_blocklist:adult"  # first category listed wins
  assert hosts.reject_reason("news.example") is None
  assert hosts.reject_reason("comment") is None
  everything = HostFilter.from_ut1(tmp_path)
  assert everything.reject_reason("a.news.example") == "host_blocklist:news"


# --- punctuation ------------------------------------------------------------------------------------------------


def test_punctuation_majority_rule():
  assert normalize_punctuation("これは，テスト．あれも，テスト．") == "これは、テスト。あれも、テスト。"
  # The comma is mostly 、 already: left alone; the period is mostly ．: changed (independently).
  assert normalize_punctuation("あ、い、う，え．お．") == "あ、い、う，え。お。"
  # Ties change nothing.
  assert normalize_punctuation("あ，い、う．え。") == "あ，い、う．え。"


def test_punctuation_keeps_fullwidth_numbers_and_ascii():
  assert normalize_punctuation("値は１．５です．") == "値は１．５です。"
  assert normalize_punctuation("ＶＥＲ．２，ｖｅｒ．３，Ｚ，です，") == "ＶＥＲ．２，ｖｅｒ．３，Ｚ，です、"
  assert normalize_punctuation("1,000円. 3.14, そして，また，") == "1,000円. 3.14, そして、また、"
  assert normalize_punctuation("普通の文、です。") == "普通の文、です。"


# --- footers ----------------------------------------------------------------------------------------------------


BODY = "本文の一行目です。\n本文の二行目です。"


def test_remove_footer_drops_footer_line_and_rest():
  text = BODY + "\n\nCOPYRIGHT © 2024 Example Inc. All Rights Reserved.\nトップへ\n"
  assert remove_footer(text) == BODY
  assert remove_footer(BODY + "\n利用規約｜プライバシーポリシー｜お問い合わせ\nリンク") == BODY
  assert normalize("本文，です．\n本文，です．\nサイトマップ") == "本文、です。\n本文、です。"


def test_remove_footer_ratio_and_window():
  # A body line mentioning a keyword briefly is kept: お問い合わせ covers 6 of 21 characters (< 0.3).
  mention = "詳しくはお問い合わせ窓口まで電話でどうぞ。"
  assert remove_footer(BODY + "\n" + mention) == BODY + "\n" + mention
  # Exactly 0.3 is not more than the ratio; just over it is.
  assert remove_footer("本文\n" + "著作権" + "あ" * 7) == "本文\n" + "著作権" + "あ" * 7
  assert remove_footer("本文\n" + "著作権" + "あ" * 6) == "本文"
  # Overlapping keywords do not count twice: ページの先頭へ and ページの先頭に戻る cover 9 of 30 characters.
  line = "ページの先頭に戻る" + "あ" * 21
  config = NormalizeConfig(footer_keywords=("ページの先頭", "ページの先頭に戻る"))
  assert remove_footer("本文\n" + line, config) == "本文\n" + line
  assert remove_footer("本文\n" + line[:-1], config) == "本文"
  # Only the last footer_window non-blank lines are searched.
  text = "Copyright\n" + "\n\n".join(f"本文{i}です。" for i in range(10))
  assert remove_footer(text) == text
  assert remove_footer(text, NormalizeConfig(footer_window=11)) == ""
  assert remove_footer(text, NormalizeConfig(footer_window=0)) == text


def test_remove_footer_first_qualifying_line_and_case():
  text = BODY + "\nご利用ください。\nお問い合わせ\n会社概要\n"
  assert remove_footer(text) == BODY + "\nご利用ください。"
  assert remove_footer(BODY + "\nall rights reserved") == BODY  # ASCII keywords ignore case
  assert remove_footer(BODY + "\nＣＯＰＹＲＩＧＨＴ") == BODY + "\nＣＯＰＹＲＩＧＨＴ"  # full-width is not folded
