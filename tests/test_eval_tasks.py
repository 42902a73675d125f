"""Task loaders, splits and prompts reproduce llm-jp-eval v1.3.0 and the Stability JP harness."""
from __future__ import annotations

import pytest

from jpllm_jax.eval import get_tasks, prompts
from jpllm_jax.eval.tasks import TASKS

from conftest import SHARED_DATA

EVAL_DATA = SHARED_DATA / "eval"


@pytest.fixture(scope="module")
def splits():
  return {name: task.splits(EVAL_DATA) for name, task in TASKS.items()}


def test_jcommonsenseqa_four_shots_follow_llm_jp_eval_selection(splits):
  task = TASKS["jcommonsenseqa"]
  shots = prompts.fewshots(task, splits["jcommonsenseqa"].fewshot_pool, 4)
  assert [s.output for s in shots] == ["3", "2", "4", "2"]  # train pool shuffled with random.seed(42)
  example = splits["jcommonsenseqa"].test[0]
  prompt = prompts.generative_prompt(task, example, shots)
  assert prompt.startswith("以下は、タスクを説明する指示と、文脈のある入力の組み合わせです。要求を適切に満たす応答を書きなさい。\n\n"
                           "### 指示:\n質問と回答の選択肢を入力として受け取り、選択肢から回答を選択してください。")
  first_shot = f"\n\n### 入力:\n{shots[0].input}\n\n### 応答:\n3\n\n### 入力:\n"
  assert first_shot in prompt and prompt.count("### 入力:") == 5
  assert prompt.endswith("\n\n### 入力:\n質問：電子機器で使用される最も主要な電子回路基板の事をなんと言う？\n"
                         "選択肢：0.掲示板,1.パソコン,2.マザーボード,3.ハードディスク,4.まな板\n\n### 応答:\n")
  # Log-likelihood form: the same template, shots answered with the choice text.
  mc = prompts.choice_prompt(task, example, shots)
  assert f"### 応答:\n{shots[0].choices[3]}\n\n" in mc and mc.endswith("### 応答:\n")


def test_split_sizes_match_the_spec(splits):
  sizes = {name: (len(s.test), len(s.fewshot_pool)) for name, s in splits.items()}
  assert sizes["jcommonsenseqa"] == (1119, 8939)
  assert sizes["jemhopqa"] == (120, 1059)
  assert sizes["jsquad"] == (4442, 4420)
  assert sizes["mgsm"] == (250, 8)
  assert sum(sizes["jmmlu"]) == 7097 and abs(sizes["jmmlu"][0] - sizes["jmmlu"][1]) <= 53
  assert sizes["niilc"] == (80, 715)  # 800 questions, 5 with only "-": 795 shuffled and split 90/10
  assert "not shipped" in splits["niilc"].note


def test_answers_and_inputs(splits):
  jsquad = splits["jsquad"].test[0]
  assert jsquad.input.startswith("文章：梅雨 [SEP] 梅雨（つゆ、ばいう）は") and "\n質問：日本で梅雨がないのは北海道とどこか。" in jsquad.input
  assert jsquad.output == "小笠原諸島"
  niilc = {e.id: e for e in splits["niilc"].test + splits["niilc"].fewshot_pool}
  assert niilc["NIILC-ECQA2015-00003-01"].output.startswith("三陸海岸の中部から南部,房総半島南部,若狭湾周辺,")
  assert "NIILC-ECQA2015-00046-01" not in niilc  # its only answer is "-"
  jmmlu = splits["jmmlu"].test[0]
  assert jmmlu.id.startswith("abstract_algebra/") and jmmlu.output in "ABCD" and len(jmmlu.choices) == 4
  assert jmmlu.input.startswith("質問：") and "\n選択肢：A." in jmmlu.input
  assert jmmlu.label == "ABCD".index(jmmlu.output)
  assert f"{jmmlu.output}.{jmmlu.choices[jmmlu.label]}" in jmmlu.input
  assert splits["jemhopqa"].test[1].output == "YES"


def test_mgsm_prompt_is_the_stability_format(splits):
  task = TASKS["mgsm"]
  shots = prompts.fewshots(task, splits["mgsm"].fewshot_pool, 4)
  prompt = prompts.generative_prompt(task, splits["mgsm"].test[0], shots)
  blocks = prompt.split("\n\n")
  assert len(blocks) == 5 and all(b.startswith("問題：") for b in blocks)
  assert blocks[0].split("\n")[1].startswith("ステップごとの答え：ロジャーは最初5個のボールがありました。")
  assert blocks[-1] == f"問題：{splits['mgsm'].test[0].input}\nステップごとの答え："
  assert splits["mgsm"].test[0].output == "18"


def test_task_selection_and_errors():
  assert [t.name for t in get_tasks("all")] == ["jcommonsenseqa", "jemhopqa", "niilc", "jsquad", "jmmlu", "mgsm"]
  assert [t.name for t in get_tasks("jsquad, mgsm")] == ["jsquad", "mgsm"]
  with pytest.raises(ValueError, match="unknown tasks"):
    get_tasks("xlsum")
  with pytest.raises(ValueError, match="few-shot pool has 8"):
    prompts.fewshots(TASKS["mgsm"], TASKS["mgsm"].splits(EVAL_DATA).fewshot_pool, 9)
  with pytest.raises(ValueError, match="no log-likelihood"):
    prompts.choice_prompt(TASKS["jsquad"], TASKS["jsquad"].splits(EVAL_DATA).test[0], [])
  with pytest.raises(FileNotFoundError, match="no data folder"):
    TASKS["jsquad"].splits(EVAL_DATA / "missing")
