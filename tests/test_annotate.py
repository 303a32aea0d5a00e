"""Human evaluation: the blind annotation page, its key, and the reader, by hand and in a real headless browser
(Debian's Chromium driven by Selenium; skipped, with the reason, where no browser is installed)."""

import json
import os
import shutil

import pytest

from configs import eval as eval_config
from jaxalign import annotate, evaluator, metrics, rated, reports

MODELS = ("model-alpha-7q", "model-beta-3z")  # names that cannot occur in the texts by chance
N_PROMPTS = 3  # per prompt set: 6 items for the one pair


def rated_records():
  return {m: {s: [{"prompt": f"Human: {s} question {i} <b>&amp;</script>?", "response": f"{s} answer {i} by {j}",
                   "score": float(i - j)} for i in range(N_PROMPTS)]
              for s in ("harmful", "helpful")} for j, m in enumerate(MODELS)}


def write_rated(folder):
  folder.mkdir(parents=True, exist_ok=True)
  for model, sets in rated_records().items():
    with open(folder / f"responses-{model}.jsonl", "w") as f:
      for set_name, records in sets.items():
        for r in records:
          f.write(json.dumps({"model": model, "set": set_name, **r}) + "\n")
  return folder


def test_page_is_blind_seeded_and_the_key_maps_every_item(tmp_path):
  records = rated_records()
  paths = annotate.write_annotation_files(records, tmp_path, seed=3)
  page = paths["page"].read_text()
  key = json.loads(paths["key"].read_text())
  assert not any(m in page for m in MODELS)  # no model name anywhere in the page
  assert "</script>?" not in page and "\\u003c/script>" in page  # a text cannot close the script element
  assert key["pairs"] == [[MODELS[1], MODELS[0]]]  # the later model first, as in the paired comparisons
  assert len(key["items"]) == 2 * N_PROMPTS and key["page_id"] in page
  items, same_key = annotate.build_items(records, seed=3)
  assert same_key == key  # seeded: the same page and key again
  for item, entry in zip(items, key["items"]):
    prompt = records[entry["left"]][entry["set"]][entry["prompt_index"]]["prompt"]
    assert item["prompt"] == prompt
    assert item["left"] == records[entry["left"]][entry["set"]][entry["prompt_index"]]["response"]
    assert item["right"] == records[entry["right"]][entry["set"]][entry["prompt_index"]]["response"]
  assert {e["left"] for e in key["items"]} == set(MODELS)  # both models appear on the left somewhere
  assert annotate.build_items(records, seed=4)[1]["page_id"] != key["page_id"]
  assert annotate.write_annotation_files({MODELS[0]: records[MODELS[0]]}, tmp_path / "one") == {}


def test_reader_win_rates_and_agreement_by_hand(tmp_path):
  paths = annotate.write_annotation_files(rated_records(), tmp_path, seed=0)
  key = json.loads(paths["key"].read_text())
  a, b = key["pairs"][0]
  ids = [item["id"] for item in key["items"]]
  by_id = {item["id"]: item for item in key["items"]}

  def choice_for(winner, item_id):
    item = by_id[item_id]
    if winner in ("tie", "both_bad"):
      return winner
    return "A" if item["left"] == (a if winner == "a" else b) else "B"

  # Annotator 1: a, a, b, tie, both_bad, a. Annotator 2 agrees on all but the last (b) and skips item 3.
  first = ["a", "a", "b", "tie", "both_bad", "a"]
  second = ["a", "a", "b", None, "both_bad", "b"]
  files = []
  for name, winners in (("ann1", first), ("ann2", second)):
    answers = [{"id": i, "choice": choice_for(w, i)} for i, w in zip(ids, winners) if w]
    files.append(tmp_path / f"{name}.json")
    files[-1].write_text(json.dumps({"format": annotate.ANSWERS_FORMAT, "page_id": key["page_id"],
                                     "annotator": name, "answers": answers}))
  report = annotate.human_report(annotate.read_annotations(files, paths["key"]), n_bootstrap=200)
  overall = next(r for r in report["win_rates"] if r["set"] == "all")
  # Item outcomes (mean over annotators): 1, 1, -1, 0, 0, (1 + -1) / 2 = 0 -> win rate (1 + 1 + 0 + 3 * 0.5) / 6.
  assert (overall["a"], overall["b"], overall["answered"], overall["judgements"]) == (a, b, 6, 11)
  assert overall["win_rate"] == pytest.approx(100 * 3.5 / 6)
  assert (overall["wins"], overall["losses"], overall["ties"], overall["both_bad"]) == (2, 1, 3, 2)
  # Agreement on the 5 items both answered: labels a a b both_bad a vs a a b both_bad b: p_o = 4/5;
  # p_e = (3/5)(2/5) + (1/5)(2/5) + (1/5)(1/5) = 9/25; kappa = (20/25 - 9/25) / (16/25) = 11/16.
  (agreement,) = report["agreement"]
  assert agreement["items"] == 5 and agreement["kappa"] == pytest.approx(11 / 16)
  assert agreement["agreement"] == pytest.approx(80.0)
  assert report["annotators"] == {"ann1": {"answered": 6, "items": 6}, "ann2": {"answered": 5, "items": 6}}

  wrong = tmp_path / "wrong.json"
  wrong.write_text(json.dumps({"format": annotate.ANSWERS_FORMAT, "page_id": "0" * 16, "answers": []}))
  with pytest.raises(ValueError, match="wrong.json: answers page"):
    annotate.read_annotations([wrong], paths["key"])
  wrong.write_text(json.dumps({"format": annotate.ANSWERS_FORMAT, "page_id": key["page_id"],
                               "answers": [{"id": ids[0], "choice": "left"}]}))
  with pytest.raises(ValueError, match="wrong.json answer 0: choice must be one of"):
    annotate.read_annotations([wrong], paths["key"])


def an_evaluation(folder, order):
  """What evaluate.py leaves in its workdir, with the models in `order` (its config.models): results, responses in
  files named after the models, the page and its key."""
  records = {m: rated_records()[m] for m in order}
  reports.write_reports(metrics.metrics_from_rated(records, baseline=None, n_bootstrap=50), folder)
  annotate.write_annotation_files(records, folder)
  return folder


def test_reading_answers_back_keeps_the_page_the_key_and_the_models_order(tmp_path):
  order = MODELS[::-1]  # not the order of the response files' names
  workdir = an_evaluation(tmp_path / "eval", order)
  assert list(rated.load_rated_responses(workdir)) == list(order)
  page, key = (workdir / annotate.PAGE_FILE).read_bytes(), (workdir / annotate.KEY_FILE).read_bytes()
  key_data = json.loads(key)
  answers = tmp_path / "ada.json"
  answers.write_text(json.dumps({"format": annotate.ANSWERS_FORMAT, "page_id": key_data["page_id"],
                                 "annotator": "Ada", "answers": [{"id": "item-0001", "choice": "A"}]}))
  c = eval_config.get_config()
  c.rated_responses, c.human_annotations, c.metrics.n_bootstrap, c.metrics.baseline = str(workdir), str(answers), 50, ""
  for _ in range(2):  # the same command twice: the page annotators hold stays readable
    results = evaluator.run(c, str(workdir))
    assert (workdir / annotate.PAGE_FILE).read_bytes() == page and (workdir / annotate.KEY_FILE).read_bytes() == key
    assert list(results["models"]) == list(order) and results["human"]["page_id"] == key_data["page_id"]
  assert list(json.loads((workdir / "results.json").read_text())["models"]) == list(order)
  # Read back into another folder: the key is found beside the responses it was made from.
  results = evaluator.run(c, str(tmp_path / "elsewhere"))
  assert results["human"]["page_id"] == key_data["page_id"]


# ------------------------------------------------------------------------------------------------ in a browser

def _browser(download_dir):
  """A headless Chromium under Selenium, or pytest.skip saying what is missing."""
  webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
  binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
  driver_path = shutil.which("chromedriver")
  if binary is None or driver_path is None:
    pytest.skip("no Chromium and chromedriver on PATH (.ci/run installs Debian's: apt-get install chromium "
                "chromium-driver)")
  options = webdriver.ChromeOptions()
  options.binary_location = binary
  for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
               "--window-size=1280,900"):
    options.add_argument(flag)
  options.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                            "download.prompt_for_download": False})
  driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
  driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)})
  return driver


def test_annotating_in_a_browser_feeds_the_evaluator(tmp_path):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  from selenium.webdriver.support import expected_conditions
  from selenium.webdriver.support.ui import WebDriverWait

  rated = write_rated(tmp_path / "rated")
  workdir = tmp_path / "eval"
  c = eval_config.get_config()
  c.rated_responses, c.metrics.n_bootstrap, c.metrics.baseline = str(rated), 200, ""
  evaluator.run(c, str(workdir))  # writes annotate.html and annotate-key.json
  key = json.loads((workdir / annotate.KEY_FILE).read_text())
  a, b = key["pairs"][0]
  downloads = tmp_path / "downloads"
  downloads.mkdir()
  driver = _browser(downloads)
  try:
    driver.get((workdir / annotate.PAGE_FILE).as_uri())
    text = lambda element_id: driver.find_element(By.ID, element_id).text
    # The page answers events in its own time: every check waits for the state it expects (Selenium's explicit
    # waits poll until it shows, up to a generous limit), never for a fixed time.
    wait = WebDriverWait(driver, 60)

    def wait_for_progress(expected):
      wait.until(expected_conditions.text_to_be_present_in_element((By.ID, "progress-text"), expected))
    # The model each item should win (a / b / tie / both bad), answered in page order: 3 by clicks, a reload,
    # then the rest by keys.
    plan = ["a", "b", "tie", "a", "both_bad", "a"]
    buttons = {"A": "A", "B": "B", "tie": "tie", "both_bad": "both_bad"}
    keys = {"A": "a", "B": "2", "tie": "t", "both_bad": "4"}

    def choice(winner, item):
      if winner in ("tie", "both_bad"):
        return winner
      return "A" if item["left"] == (a if winner == "a" else b) else "B"

    def check_shows(item_index):
      entry = key["items"][item_index]
      wait_for_progress(f"Item {item_index + 1} of 6")
      assert text("left").endswith(f"by {MODELS.index(entry['left'])}")
      assert text("right").endswith(f"by {MODELS.index(entry['right'])}")
      assert text("prompt") == f"Human: {entry['set']} question {entry['prompt_index']} <b>&amp;</script>?"

    for i in range(3):
      check_shows(i)
      side = choice(plan[i], key["items"][i])
      driver.find_element(By.CSS_SELECTOR, f"button.choice[data-choice='{buttons[side]}']").click()
      wait_for_progress(f"{i + 1} answered")
    driver.refresh()  # closed and reopened: the answers and the position survive
    wait_for_progress("Item 4 of 6 · 3 answered")
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.ARROW_LEFT)  # back to item 3: its answer is highlighted
    wait_for_progress("Item 3 of 6")
    selected = wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, "button.choice.selected")))
    assert selected.get_attribute("data-choice") == choice(plan[2], key["items"][2])
    body.send_keys(Keys.ARROW_RIGHT)
    for i in range(3, 6):
      check_shows(i)
      body.send_keys(keys[choice(plan[i], key["items"][i])])
      wait_for_progress(f"{i + 1} answered")
    wait.until(expected_conditions.visibility_of_element_located((By.ID, "done")))
    name = driver.find_element(By.ID, "annotator")
    name.send_keys("Ada")
    driver.save_screenshot(str(tmp_path / "annotate.png"))
    if os.environ.get("JAXALIGN_SCREENSHOT"):
      shutil.copyfile(tmp_path / "annotate.png", os.environ["JAXALIGN_SCREENSHOT"])
    wait.until(lambda _: name.get_attribute("value") == "Ada")
    driver.find_element(By.ID, "download").click()
    # Chromium writes a download under a temporary name and renames it when complete.
    (downloaded,) = wait.until(lambda _: list(downloads.glob("annotations-*.json")))
  finally:
    driver.quit()

  saved = json.loads(downloaded.read_text())
  assert downloaded.name == f"annotations-Ada-{key['page_id'][:8]}.json" and saved["annotator"] == "Ada"
  assert [(x["id"], x["choice"]) for x in saved["answers"]] == [
      (entry["id"], choice(w, entry)) for entry, w in zip(key["items"], plan)]

  c.human_annotations = str(downloaded)
  results = evaluator.run(c, str(workdir))
  overall = next(r for r in results["human"]["win_rates"] if r["set"] == "all")
  # a wins 3, b 1, tie and both bad count half: (3 + 0.5 + 0.5) / 6.
  assert (overall["wins"], overall["losses"], overall["ties"], overall["both_bad"]) == (3, 1, 2, 1)
  assert overall["win_rate"] == pytest.approx(100 * 4 / 6)
  for set_name in ("harmful", "helpful"):
    row = next(r for r in results["human"]["win_rates"] if r["set"] == set_name)
    outcomes = [annotate.OUTCOMES[w] for entry, w in zip(key["items"], plan) if entry["set"] == set_name]
    assert row["win_rate"] == pytest.approx(100 * sum((o + 1) / 2 for o in outcomes) / len(outcomes))
  saved_results = json.loads((workdir / "results.json").read_text())
  assert saved_results["human"]["win_rates"][0]["win_rate"] == pytest.approx(100 * 4 / 6)
  assert "## Human evaluation" in (workdir / "results.md").read_text()
