"""The typed contracts (records, recipes) and the job layer, on small synthetic records: one reader
and writer per contract, errors that name file:line and field, paths kept inside their folders,
recipes as the single source of truth, settings pins, stale temps, one summary schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from reliableswap.choices import OutputFormat, ReshapeMethod, Strategy
from reliableswap.jobs import Job, SettingsMismatch, reject, remove_stale_temps
from reliableswap.recipes import PairsSection, RecipeError, TrainRecipe, TripletRecipe, builtin_recipes, load_recipe, validate_recipe
from triplets.records import ContractError, FlowRecord, ManifestRecord, PairRecord, resolve_inside
from reliableswap.contracts import FaceRecord, FaceSet, FlameRecord, Summary
from conftest import run_cli as _cli

ROOT = Path(__file__).resolve().parents[1]


def face(fid: str = "f0", **over) -> dict:
    rec = {
        "schema": "reliableswap.faces/1", "id": fid, "image": f"faces/{fid}.png",
        "origin": {"path": "in/a.jpg", "frame": None, "face_index": 0, "size": [640, 480]}, "align": "ffhq", "size": 256,
        "bbox": [10.0, 20.0, 110.0, 120.0], "landmarks68": [[100.0 + i, 120.0 + (i % 7)] for i in range(68)],
        "pose": {"yaw": 3.0, "pitch": -8.0, "roll": 1.0}, "inverse": [[0.5, 0.0, 10.0], [0.0, 0.5, 20.0]],
        "quality": {"det_score": 1.2, "face_px": 100.0, "sharpness": 3.0}, "identity": None,
    }
    rec.update(over)
    return rec


def write_lines(path: Path, recs: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


def test_records_round_trip_and_keep_unknown_fields(tmp_path):
    recs = [face("a", extra={"kept": True}), face("b", embedding=[0.1] * 128)]
    FaceRecord.write(tmp_path / "faces.jsonl", recs)
    back = FaceRecord.read(tmp_path / "faces.jsonl")
    assert [r.id for r in back] == ["a", "b"] and back[0].extra == {"kept": True} and len(back[1].embedding) == 128
    assert back[0].where == f"{tmp_path / 'faces.jsonl'}:1"
    FaceRecord.write(tmp_path / "again.jsonl", back)
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "faces.jsonl").read_bytes()
    PairRecord.write(tmp_path / "p.jsonl", [PairRecord(a="a", b="b", pose_delta={"yaw": 1, "pitch": 0, "roll": 0})])
    assert PairRecord.read(tmp_path / "p.jsonl")[0].pose_delta.yaw == 1.0
    m = ManifestRecord(pair={"index": 0, "a": "a", "b": "b"}, folder="00000000")
    assert ManifestRecord.model_validate(m.to_json()) == m


@pytest.mark.parametrize("change, field, words", [
    ({"id": "../../../ESCAPED"}, "id", "pattern"),
    ({"id": "/abs/x"}, "id", "pattern"),
    ({"id": ".hidden"}, "id", "pattern"),
    ({"id": "x" * 121}, "id", "pattern"),
    ({"image": "../outside.png"}, "image", "relative path"),
    ({"image": "/etc/passwd"}, "image", "relative path"),
    ({"landmarks68": [[1.0, 2.0]] * 67}, "landmarks68", "68"),
    ({"landmarks68": [[float("nan"), 2.0]] + [[1.0, 2.0]] * 67}, "landmarks68.0.0", "finite"),
    ({"landmarks68": [[1e30, 2.0]] + [[1.0, 2.0]] * 67}, "record", "far outside"),
    ({"size": "big"}, "size", "integer"),
    ({"pose": {"yaw": 1.0, "pitch": 2.0}}, "pose.roll", "required"),
    ({"schema": "reliableswap.faces/2"}, "schema", "is not"),
])
def test_a_bad_face_record_names_file_line_and_field(tmp_path, change, field, words):
    path = write_lines(tmp_path / "faces.jsonl", [face("ok"), face("bad", **change)])
    with pytest.raises(ContractError) as e:
        FaceRecord.read(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:2: {field}:") and words in msg and "\n" not in msg, msg
    good, bad = FaceRecord.read_valid(path)  # one bad line never stops the others
    assert [r.id for r in good] == ["ok"] and len(bad) == 1


def test_unreadable_lines_are_refused_with_their_line(tmp_path):
    path = write_lines(tmp_path / "faces.jsonl", [face("a"), "not json", "[1, 2]", "", face("b")])
    good, bad = FaceRecord.read_valid(path)
    assert [r.id for r in good] == ["a", "b"]
    assert [str(e).split(": ")[0] for e in bad] == [f"{path}:2", f"{path}:3"]
    huge = tmp_path / "huge.jsonl"
    huge.write_bytes(b'{"x": "' + b"a" * (2 << 20) + b'"}\n' + json.dumps(face("c")).encode() + b"\n")
    good, bad = FaceRecord.read_valid(huge)
    assert [r.id for r in good] == ["c"] and "longer than" in str(bad[0])


def test_paths_from_contracts_stay_inside_their_folder(tmp_path):
    base = tmp_path / "prep"
    (base / "faces").mkdir(parents=True)
    (base / "faces" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"s")
    (base / "faces" / "link.png").symlink_to(tmp_path / "secret.png")
    (base / "faces" / "loop.png").symlink_to(base / "faces" / "loop.png")
    assert resolve_inside(base, "faces/a.png") == base / "faces" / "a.png"
    for rel in ("../secret.png", "/etc/passwd", "faces/link.png", "faces/loop.png", "faces/../../secret.png"):
        with pytest.raises(ContractError, match="leads outside"):
            resolve_inside(base, rel, "faces.jsonl:1", "image")


def test_faceset_joins_flame_and_refuses_duplicate_ids(tmp_path):
    write_lines(tmp_path / "faces.jsonl", [face("a"), face("b")])
    fl = {"schema": "reliableswap.flame/1", "id": "a", "size": 256, "rmse_px": 1.0, "shape": [0.0] * 10,
          "expression": [0.0] * 5, "global_pose": [0, 0, 0], "neck": [0, 0, 0], "jaw": [0, 0, 0], "eyes": [0] * 6,
          "camera": [8, 0, 0]}
    FlameRecord.write(tmp_path / "flame.jsonl", [fl])
    fs = FaceSet.load(tmp_path)
    assert len(fs) == 2 and "a" in fs.flame and "b" not in fs.flame and fs["b"].id == "b"
    write_lines(tmp_path / "faces.jsonl", [face("a"), face("b"), face("a")])
    with pytest.raises(ContractError, match=r"faces.jsonl:3: id: 'a' already used at .*faces.jsonl:1"):
        FaceSet.load(tmp_path)
    with pytest.raises(ContractError, match="no faces.jsonl"):
        FaceSet.load(tmp_path / "nowhere")
    # flow keys join two ids: a key of two longest ids is valid (this raises otherwise)
    FlowRecord(key="a" * 120 + "__" + "b" * 120, a="a" * 120, b="b" * 120, flow="f.npz", size=256)


# -- recipes ----------------------------------------------------------------------------------------

def test_every_recipe_file_loads_and_round_trips():
    for path in sorted((ROOT / "recipes").glob("*.toml")):
        kind = tomllib.loads(path.read_text())["kind"]
        cls = TripletRecipe if kind == "triplets" else TrainRecipe
        r = load_recipe(path, cls)
        assert validate_recipe(cls, tomllib.loads(r.to_toml()), "round trip") == r, path.name
    # the built-in default is recipes/cycle.toml, and the CLI's pairing defaults are the recipe's
    assert load_recipe(ROOT / "recipes" / "cycle.toml", TripletRecipe) == TripletRecipe()
    assert TripletRecipe().pairs == PairsSection() and PairsSection().max_yaw_diff == 20.0


def test_built_in_recipes_are_reached_by_name_and_nothing_else(tmp_path, monkeypatch):
    """An installed package has no recipes/ folder: ``--recipe tps`` reads the packaged file. A name
    is only a built-in when no such file exists, and never a path outside the package."""
    assert builtin_recipes() == sorted(p.stem for p in (ROOT / "recipes").glob("*.toml"))
    assert load_recipe("tps", TripletRecipe) == load_recipe(ROOT / "recipes" / "tps.toml", TripletRecipe)
    assert load_recipe("tiny.toml", TrainRecipe) == load_recipe(ROOT / "recipes" / "tiny.toml", TrainRecipe)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tps").write_text('kind = "triplets"\n[blend]\nlevels = 3\n')  # a file of that name wins
    assert load_recipe("tps", TripletRecipe).blend.levels == 3
    for bad in ("nosuch", "../recipe_files/tps", "TPS", "a/tps"):
        with pytest.raises(RecipeError, match="no such file|cannot read"):
            load_recipe(bad, TripletRecipe)


@pytest.mark.parametrize("text, words", [
    ('kind = "triplets"\n[blend]\nlevels = "six"\n', "[blend] levels: Input should be a valid integer"),
    ('kind = "triplets"\n[blend]\nlevels = 0\n', "[blend] levels: Input should be greater than or equal to 1"),
    ('kind = "triplets"\n[blend]\nlevel = 6\n', "[blend] level: unknown key"),
    ('kind = "triplets"\n[qcc]\nenabled = true\n', "qcc: unknown key"),
    ('kind = "triplets"\n[output]\nformat = "zip"\n', "[output] format: Input should be 'folder' or 'webdataset'"),
    ('kind = "triplets"\n[reenact]\nbackend = "os.system"\n', "[reenact] backend: String should match pattern"),
    ('kind = "train"\n', "is kind = 'train', but this command needs a recipe with kind = 'triplets'"),
    ('[blend]\nlevels = 6\n', "has no kind key"),
    ('kind = "triplets"\nlevels = [', "not valid TOML"),
])
def test_a_bad_recipe_fails_at_load_naming_the_key(tmp_path, text, words):
    path = tmp_path / "r.toml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path, TripletRecipe)
    assert str(e.value).startswith(str(path)) and words in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("text, words", [
    ("[optim]\nlr = \"fast\"\n", "[optim] lr: Input should be a valid number"),
    ("[train]\nsteps = \"ten\"\n", "[train] steps: Input should be a valid integer"),
    ("[data]\nbatch = 0\n", "[data] batch: Input should be greater than or equal to 1"),
    ("[train]\nlog_every = 0\n", "[train] log_every"),
    ("[model]\nsize = 96\n", "[model] size: must be a power of two"),
    ("[model]\nsize = 16384\n", "[model] size: Input should be less than or equal to 1024"),
    ("[identity]\nkind = \"vgg\"\n", "[identity] kind: Input should be 'sface', 'dlib' or 'arcface'"),
])
def test_a_bad_training_recipe_fails_at_load(tmp_path, text, words):
    path = tmp_path / "t.toml"
    path.write_text('kind = "train"\n' + text)
    with pytest.raises(RecipeError, match=None) as e:
        load_recipe(path, TrainRecipe)
    assert words in str(e.value), str(e.value)


def test_overrides_return_a_new_validated_recipe():
    r = TripletRecipe()
    r2 = r.with_overrides({"output.format": "webdataset", "qc.enabled": True, "pairs.strategy": None})
    assert r.output.format == OutputFormat.folder and not r.qc.enabled  # the loaded recipe is untouched
    assert r2.output.format == OutputFormat.webdataset and r2.qc_on and r2.pairs.strategy == Strategy.pose
    with pytest.raises(RecipeError, match=r"command-line flags: \[output\] shard_size"):
        r.with_overrides({"output.shard_size": 0})
    assert TripletRecipe().with_overrides({"reenact.backend": "flame", "reshape.method": "flame"}).uses_flame
    # a recipe naming another reenactor and no reshape method gets the 2D reshape, not the mesh one
    assert validate_recipe(TripletRecipe, {"kind": "triplets", "reenact": {"backend": "tps"}}, "r").reshape.method == ReshapeMethod.tps
    with pytest.raises(RecipeError, match=r"command-line flags: \[reshape\] method = \"mesh\" needs \[reenact\] backend = \"mesh\"$"):
        r.with_overrides({"reenact.backend": "flame", "reshape.method": "mesh"})


# -- the job layer --------------------------------------------------------------------------------

def test_job_pins_settings_and_records_units(tmp_path):
    with Job("demo", tmp_path, {"size": 256, "mode": "a"}, "things") as job:
        assert not job.is_done("u1")
        job.save_unit("u1", {"n": 1})
        with job.stage("work"):
            pass
        s = job.finish(n_in=3, written=1, written_this_run=1, skipped=0, rejects=[reject("x.jpg", "no face\\nfound")])
    assert job.is_done("u1") and job.load_unit("u1") == {"n": 1} and job.done_keys() == ["u1"]
    Summary.load(tmp_path / "summary.json")  # the one schema
    assert s["counts"] == {"in": 3, "written": 1, "written_this_run": 1, "skipped": 0, "rejected": 1,
                           "rejected_by_reason": {"no face\\nfound": 1}}
    assert s["throughput"]["unit"] == "things" and "work" in s["timings"]["stages_s"]
    Job("demo", tmp_path, {"size": 256, "mode": "a"}, "things")  # same settings: resumes
    with pytest.raises(SettingsMismatch, match="size: 256 → 512"):
        Job("demo", tmp_path, {"size": 512, "mode": "a"}, "things")
    shared = Job("fit", tmp_path, {}, "faces", shared="fit").finish(n_in=0, written=0, written_this_run=0, rejects=[])
    assert (tmp_path / "fit.summary.json").is_file() and (tmp_path / "fit.rejects.jsonl").is_file() and shared["command"] == "fit"


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f".a.json.{dead_pid}.xyz.tmp").write_text("half")
    (tmp_path / f".00000001.{dead_pid}.abc.tmp").mkdir()
    live = tmp_path / f".b.json.{os.getpid()}.xyz.tmp"
    live.write_text("in flight")
    assert remove_stale_temps(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == [live.name]


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="zombie state is read from /proc")
def test_temps_of_a_zombie_writer_are_removed(tmp_path):
    """A killed prep worker whose parent died stays a zombie until reaped (for ever under a
    container init that does not reap): it writes nothing more, so its temps are stale. A
    resumed run once kept such a temp (tests/test_prep.py kill-and-resume, flaky before)."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 10
    while time.time() < deadline and Path(f"/proc/{zombie.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
        time.sleep(0.05)
    try:
        (tmp_path / f".c.png.{zombie.pid}.xyz.tmp").write_text("half")
        assert remove_stale_temps(tmp_path) == 1 and not list(tmp_path.iterdir())
    finally:
        zombie.wait()


# -- the CLI's one error boundary -----------------------------------------------------------------

def test_cli_bad_contract_and_recipe_are_one_line_with_exit_2(tmp_path):
    folder = tmp_path / "prep"
    folder.mkdir()
    write_lines(folder / "faces.jsonl", [face("a"), face("b", size="big")])
    r = _cli("pairs", str(folder), "--out", str(tmp_path / "p.jsonl"))  # the bad line is left out: one face remains
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(errors) == 1
    assert "faces.jsonl:2: size: Input should be a valid integer" in errors[0], r.stderr
    write_lines(folder / "faces.jsonl", [face("a"), face("b"), face("a")])
    r = _cli("pairs", str(folder), "--out", str(tmp_path / "p.jsonl"))  # a duplicate id refuses the run
    assert r.returncode == 2 and "faces.jsonl:3: id: 'a' already used at" in r.stderr, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('kind = "triplets"\n[blend]\nlevels = "six"\n')
    r = _cli("triplets", str(folder), "--pairs", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"), "--recipe", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "[blend] levels" in r.stderr, r.stderr
    r = _cli("triplets", str(folder), "--pairs", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"), "--format", "zip")
    assert r.returncode == 2 and "zip" in r.stderr and "Traceback" not in r.stderr
    r = _cli("--debug", "pairs", str(folder), "--out", str(tmp_path / "p.jsonl"))
    assert r.returncode != 0 and "Traceback" in r.stderr  # --debug shows where it came from


def test_every_record_says_where_it_was_read(tmp_path):
    """``record.where`` is ``file:line`` for every contract (a validator named ``_where`` once
    shadowed it on ManifestRecord, so messages about manifest lines named a bound method)."""
    import reliableswap.contracts as rc
    import triplets.records as tr

    kinds = [c for m in (tr, rc) for c in vars(m).values() if isinstance(c, type) and issubclass(c, tr.Record) and c is not tr.Record]
    assert len(kinds) >= 6
    for cls in kinds:
        assert "_where" not in cls.__dict__ and "where" not in cls.__dict__, cls.__name__
    m = tr.ManifestRecord(pair={"index": 0, "a": "a", "b": "b"}, folder="00000000")
    tr.ManifestRecord.write(tmp_path / "manifest.jsonl", [m])
    assert tr.ManifestRecord.read(tmp_path / "manifest.jsonl")[0].where == f"{tmp_path / 'manifest.jsonl'}:1"


def test_a_value_error_from_numpy_is_an_internal_error_not_bad_input(tmp_path, monkeypatch, capsys):
    """A ValueError raised by numpy inside a command is a bug: "internal error", exit 3, never
    blamed on the user's input. The same place raising a UserError is one line and exit 2; the
    operating system refusing a file is exit 2 too."""
    import numpy as np

    from reliableswap import cli
    from reliableswap.errors import UserError
    from reliableswap.testing.faces import write_synthetic_prep

    prep = write_synthetic_prep(tmp_path / "prep", 3)
    args = ["pairs", str(prep), "--out", str(tmp_path / "p.jsonl")]

    def numpy_bug(*a, **k):
        return np.reshape(np.arange(3), (2, 2))  # numpy: "cannot reshape array of size 3 into shape (2,2)"

    monkeypatch.setattr("reliableswap.commands.pairs.make_pairs", numpy_bug)
    assert cli.main(args) == 3
    out = capsys.readouterr().err
    assert "internal error: ValueError: cannot reshape" in out and "--debug" in out and "Traceback" not in out

    def user_mistake(*a, **k):
        raise UserError("faces.jsonl:2: size: too small")

    monkeypatch.setattr("reliableswap.commands.pairs.make_pairs", user_mistake)
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: faces.jsonl:2: size: too small"

    def refused(*a, **k):
        open(tmp_path / "no" / "such" / "file")

    monkeypatch.setattr("reliableswap.commands.pairs.make_pairs", refused)
    assert cli.main(args) == 2
    assert "error: [Errno 2] No such file or directory" in capsys.readouterr().err
