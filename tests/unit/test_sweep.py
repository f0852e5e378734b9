"""`launcher sweep` and `sweep_report` without training: the --grid/--space syntax, seeded draws, refusals through the
real CLI, the job-array script (rendered, and run by bash against the srun/scontrol stand-ins of
test_slurm_script.py), and the report's ranking on hand-made trainer_state.json files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from launcher import slurm
from launcher import sweep as sweeps
from launcher import sweep_report as reports
from launcher import sweep_space as spaces
from launcher.errors import RecipeError
from launcher.schema import SlurmSection
from tests.helpers import cli, run_batch_script, stand_ins

SAFE_NAME = re.compile(r"^v\d\d[A-Za-z0-9._=+-]*$")


def test_grid_is_the_cartesian_product_last_key_fastest():
    grid = spaces.parse_grid("training.learning_rate=[1e-5, 3e-5] lora.r=[8,16]")
    assert grid == {"training.learning_rate": [1e-5, 3e-5], "lora.r": [8, 16]}
    assert spaces.grid_points(grid) == [
        {"training.learning_rate": 1e-5, "lora.r": 8}, {"training.learning_rate": 1e-5, "lora.r": 16},
        {"training.learning_rate": 3e-5, "lora.r": 8}, {"training.learning_rate": 3e-5, "lora.r": 16}]


def test_grid_values_are_typed_as_on_the_command_line():
    grid = spaces.parse_grid("training.lr_scheduler_type=[cosine,linear] training.bf16=[true,False] "
                             "lora.target_modules=[[q_proj, v_proj],all-linear] data.train.0.path=['a,b.jsonl']")
    assert grid == {"training.lr_scheduler_type": ["cosine", "linear"], "training.bf16": [True, False],
                    "lora.target_modules": [["q_proj", "v_proj"], "all-linear"], "data.train.0.path": ["a,b.jsonl"]}
    assert isinstance(spaces.parse_grid("lora.r=[8]")["lora.r"][0], int)


def test_grid_and_space_values_are_yaml_flow_syntax():
    grid = spaces.parse_grid(" data.train.0.path=[\"/data/a b, c.jsonl\", 'it''s', /data/d e.jsonl]  "
                             "training.learning_rate=[1e-5, 1E-3, 1.0e5, .5, '1e-5', 2]   lora.target_modules=[[q, "
                             "v], [all-linear], {x: [1, 2]}] training.bf16=[TRUE, false] run.x=[no, on, 010, None, ~]")
    assert grid == {"data.train.0.path": ["/data/a b, c.jsonl", "it's", "/data/d e.jsonl"],
                    "training.learning_rate": [1e-5, 1e-3, 1e5, 0.5, "1e-5", 2],
                    "lora.target_modules": [["q", "v"], ["all-linear"], {"x": [1, 2]}],
                    "training.bf16": [True, False], "run.x": ["no", "on", "010", None, None]}
    assert [type(v) for v in grid["training.learning_rate"]] == [float, float, float, float, str, int]
    space = spaces.parse_space("lora.target_modules=choice([q, v], \"all, linear\", true) "
                               "training.learning_rate=loguniform( 1e-5 , 1e-3 )")
    assert space == {"lora.target_modules": ("choice", [["q", "v"], "all, linear", True]),
                     "training.learning_rate": ("loguniform", [1e-5, 1e-3])}


@pytest.mark.parametrize(("parse", "text", "message"), [
    (spaces.parse_grid, "lora.r=[8, [16]", "--grid: lora.r= is missing a closing ']'"),
    (spaces.parse_grid, "data.train.0.path=['a b, c]", "--grid: data.train.0.path= is missing a closing \"'\""),
    (spaces.parse_grid, "lora.r=[8, {a: 1]", "--grid: lora.r= is not YAML flow syntax: expected ',' or '}', but got "
                                            "']' at ']'"),
    (spaces.parse_grid, "lora.r=[8,16]]", "--grid: lora.r= is not YAML flow syntax: expected '<document start>', but "
                                          "found ']' at ']'"),
    (spaces.parse_grid, "lora.r=[8] lora.r=[16]", "--grid: lora.r is given twice"),
    (spaces.parse_grid, "lora.r=[]", "--grid: lora.r=[] lists no values"),
    (spaces.parse_grid, "lora.r=8", "--grid: lora.r=8 is not a list of values in brackets, like lora.r=[1,2]"),
    (spaces.parse_grid, "  ", "--grid takes one quoted string of section.key=... terms"),
    (spaces.parse_space, "lora.r=choice(8,16", "--space: lora.r= is missing a closing ')'"),
    (spaces.parse_space, 'lora.r=choice(8, "16)', "--space: lora.r= is missing a closing '\"'"),
    (spaces.parse_space, "lora.r=choice()", "--space: lora.r=choice() offers no values"),
    (spaces.parse_space, "lora.r=randint(8, 16.5)", "--space: lora.r=randint(8, 16.5) needs two integers"),
    (spaces.parse_space, "lora.r=uniform(1e-3, a)", "--space: lora.r=uniform(0.001, a) needs two numbers"),
])
def test_malformed_values_name_the_problem(parse, text, message):
    with pytest.raises(RecipeError) as err:
        parse(text)
    assert str(err.value).startswith(f"command line: {message}"), str(err.value)


def test_random_draws_are_seeded_in_range_and_distinct():
    space = spaces.parse_space("training.learning_rate=loguniform(1e-5, 1e-3) training.weight_decay=uniform(0,0.1) "
                               "lora.r=choice(8,16,32) training.warmup_steps=randint(0, 5)")
    draws = spaces.random_points(space, 20, seed=0)
    assert draws == spaces.random_points(space, 20, seed=0)
    assert draws != spaces.random_points(space, 20, seed=1)
    assert len({json.dumps(d) for d in draws}) == 20
    for d in draws:
        assert 1e-5 <= d["training.learning_rate"] <= 1e-3
        assert 0 <= d["training.weight_decay"] <= 0.1
        assert d["lora.r"] in (8, 16, 32)
        assert isinstance(d["training.warmup_steps"], int) and 0 <= d["training.warmup_steps"] <= 5
    rates = sorted(d["training.learning_rate"] for d in draws)
    assert rates[0] < 1e-4 < rates[-1]  # log-uniform: both decades are drawn from


def test_random_refuses_more_variants_than_the_space_has():
    with pytest.raises(RecipeError, match="only 2 distinct points"):
        spaces.random_points(spaces.parse_space("lora.r=choice(8,16)"), 3, seed=0)


def test_variant_names_are_short_unique_and_filesystem_safe():
    points = [{"training.learning_rate": 1e-5, "data.train.0.path": "/data/a b.jsonl"},
              {"training.learning_rate": 1e-5, "data.train.0.path": "/data/" + "x" * 200}]
    names = [spaces.variant_name(i, 2, p) for i, p in enumerate(points)]
    assert names[0] == "v00-learning_rate=1e-05-path=_data_a_b.jsonl"
    assert len(set(names)) == 2 and all(SAFE_NAME.match(n) and len(n) <= 80 for n in names)


@pytest.mark.parametrize(("flags", "message"), [
    (["--grid", "training.learning_rate=[1e-3, 3e-3"], "--grid: training.learning_rate= is missing a closing ']'"),
    (["--grid", "training.learning_rate=1e-3"], "is not a list of values in brackets"),
    (["--grid", "learning_rate=[1e-3]"], "--grid: expected section.key=... at 'learning_rate=[1e-3]'"),
    (["--grid", "training.learning_rat=[1e-3]"], "training.learning_rat is not an SFTConfig argument (did you mean "
                                                 "'learning_rate'?)"),
    (["--grid", "training.learning_rate=[1e-3,fast]"], "training.learning_rate must be float or int, got str 'fast'"),
    (["--grid", "run.output_dir=[a,b]"], "run.output_dir cannot be swept"),
    (["--random", "2", "--space", "training.learning_rate=normal(0,1)"], "is not one of uniform(...)"),
    (["--random", "2", "--space", "training.learning_rate=loguniform(0,1)"], "needs low > 0"),
    (["--space", "training.learning_rate=uniform(0,1)"], "--space needs --random N"),
    (["--gird", "training.learning_rate=[1e-3]"], "unknown option --gird (did you mean 'grid'?)"),
])
def test_bad_sweeps_are_one_line_exit_2_and_write_nothing(recipe_factory, tmp_path, flags, message):
    result = cli("sweep", recipe_factory(), *flags)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_every_variant_is_validated_not_only_the_first(recipe_factory):
    result = cli("sweep", recipe_factory(), "--grid", "training.learning_rate=[1e-3,3e-3,fast]")
    assert result.returncode == 2 and "sweep variant v02-learning_rate=fast:" in result.stderr


def test_variants_get_their_run_dir_name_and_wandb_group(recipe_factory, tmp_path):
    recipe = recipe_factory(wandb={"project": "p", "mode": "offline", "group": "from-recipe"})
    points = spaces.grid_points(spaces.parse_grid("training.learning_rate=[1e-3,3e-3]"))
    sweep = sweeps.build(str(recipe), {"training.max_steps": 7}, points, {"grid": "..."})
    plans = sweeps.validate(sweep, sweeps.topology.Topology((2,)))
    assert sweep.directory == tmp_path / "run-sweep"
    for variant, plan, rate in zip(sweep.variants, plans, (1e-3, 3e-3), strict=True):
        assert plan.run_dir == tmp_path / "run-sweep" / variant.name
        assert plan.recipe.run.name == f"smoke-{variant.name}"
        assert plan.recipe.wandb.group == "smoke-sweep"
        assert plan.recipe.training["learning_rate"] == rate and plan.recipe.training["max_steps"] == 7
    without = sweeps.build(str(recipe_factory()), {}, points, {})
    assert "wandb.group" not in without.overrides(without.variants[0])


def test_a_different_sweep_in_the_same_directory_is_refused(recipe_factory):
    recipe = recipe_factory()
    points = spaces.grid_points(spaces.parse_grid("training.learning_rate=[1e-3,3e-3]"))
    first = sweeps.build(str(recipe), {}, points, {})
    sweeps.write_manifest(first.directory, sweeps.open_manifest(first))
    same = cli("sweep", recipe, "--grid", "training.learning_rate=[1e-3,3e-3]", "--dry_run")
    assert same.returncode == 0, same.stderr
    other = cli("sweep", recipe, "--grid", "training.learning_rate=[1e-3,5e-3]", "--dry_run")
    assert other.returncode == 2 and "holds a different sweep" in other.stderr


def test_slurm_dry_run_prints_one_job_array_and_submits_nothing(recipe_factory, tmp_path):
    result = cli("sweep", recipe_factory(), "--grid", "training.learning_rate=[1e-3,3e-3]", "--slurm", "--nodes", 2,
                 "--gpus_per_node", 1, "--max_parallel", 1, "--partition", "gpu", "--dry_run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    sweep_dir = tmp_path / "run-sweep"
    for option in ("--array=0-1%1", f"--output={sweep_dir}/logs/%x-%A_%a.log", "--job-name=smoke-sweep",
                   "--nodes=2", "--partition=gpu", "--requeue", f"--comment=launcher:{sweep_dir}"):
        assert f"#SBATCH {option}" in lines, option
    assert f"    '{sweep_dir}/v00-learning_rate=0.001'" in lines
    assert f"    '{sweep_dir}/v01-learning_rate=0.003'" in lines
    assert 'export RUN_DIR="${RUN_DIRS[$SLURM_ARRAY_TASK_ID]}"' in lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"], "a dry run wrote files"


@pytest.fixture
def array_job(tmp_path, monkeypatch):
    """The array script for 2 variants, run as Slurm would run task 1 of array 77; returns (rc, output, calls)."""
    bin_dir = stand_ins(tmp_path, monkeypatch)
    dirs = [tmp_path / "sweep" / "v00-r=8", tmp_path / "sweep" / "v01-r=16"]
    for d in dirs:
        d.mkdir(parents=True)
    script = slurm.render(tmp_path / "sweep", "demo-sweep", SlurmSection(nodes=2, gpus_per_node=4), True, True,
                          array=dirs, max_parallel=2)
    (tmp_path / "job.sbatch").write_text(script)

    def run(**env) -> tuple[int, str, list[str]]:
        return run_batch_script(tmp_path / "job.sbatch", bin_dir,
                                {"SLURM_JOB_ID": "79", "SLURM_ARRAY_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "1", **env})

    run.dirs = dirs
    return run


def test_array_task_trains_its_own_variant_and_consolidates_it(array_job):
    rc, output, calls = array_job()
    assert rc == 0, output
    launches = [c for c in calls if " launch " in c]
    assert len(launches) == 2 and all(f"launch {array_job.dirs[1]}/recipe.yaml " in c for c in launches)
    assert [c for c in calls if " consolidate " in c] == [
        f"node=0 secret= args=-m launcher consolidate {array_job.dirs[1]} {array_job.dirs[1]}/final --overwrite"]
    assert "array task 77_1 trains" in output


def test_stopped_array_task_requeues_only_itself(array_job):
    rc, _, calls = array_job(STOP="1")
    assert rc == 0
    assert [c for c in calls if c.startswith("requeue")] == ["requeue 77_1"]


def test_array_task_beyond_the_list_fails(array_job):
    rc, _, calls = array_job(SLURM_ARRAY_TASK_ID="2")
    assert rc != 0 and not [c for c in calls if " launch " in c]


# --- the report --------------------------------------------------------------------------------------------------

def fake_run(run_dir: Path, steps: int, max_steps: int, loss: float, eval_loss: float | None, accuracy: float,
             finished: bool = True) -> None:
    """The files a worker leaves: trainer_state.json (save_state) and, at the end, a complete final checkpoint."""
    history = [{"loss": loss + 1, "step": steps // 2}, {"loss": loss, "step": steps}]
    if eval_loss is not None:
        history.append({"eval_loss": eval_loss, "eval_mean_token_accuracy": accuracy, "eval_runtime": 0.5,
                        "step": steps})
    history.append({"train_loss": loss + 0.5, "train_runtime": 3.0, "step": steps})
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{steps}"
    checkpoint.mkdir(parents=True)
    state = {"global_step": steps, "max_steps": max_steps, "log_history": history}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    if finished:
        (run_dir / "checkpoints" / "trainer_state.json").write_text(json.dumps(state))
        (checkpoint / "complete.json").write_text(json.dumps({"step": steps, "max_steps": max_steps}))


@pytest.fixture
def sweep_dir(tmp_path):
    directory = tmp_path / "run-sweep"
    variants = [("v00-lr=1", None), ("v01-lr=2", None), ("v02-lr=3", 1), ("v03-lr=4", None), ("v04-lr=5", None)]
    entries = [{"name": name, "overrides": {"training.learning_rate": i + 1}, "run_dir": str(directory / name),
                **({"exit_code": code} if code is not None else {})} for i, (name, code) in enumerate(variants)]
    fake_run(directory / "v00-lr=1", 10, 10, loss=2.0, eval_loss=2.5, accuracy=0.50)
    fake_run(directory / "v01-lr=2", 10, 10, loss=2.2, eval_loss=1.5, accuracy=0.60)
    fake_run(directory / "v03-lr=4", 5, 10, loss=1.0, eval_loss=None, accuracy=0, finished=False)
    sweeps.write_manifest(directory, {"name": "run-sweep", "variants": entries})
    return directory


def test_report_ranks_by_eval_loss_with_unfinished_and_failed_last(sweep_dir):
    result = cli("sweep-report", sweep_dir, "--format", "json")  # python-fire takes the dashed spelling too
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["metric"] == "eval_loss" and report["better"] == "lower"
    rows = report["variants"]
    assert [r["variant"] for r in rows] == ["v01-lr=2", "v00-lr=1", "v02-lr=3", "v03-lr=4", "v04-lr=5"]
    assert [r.get("rank") for r in rows] == [1, 2, None, None, None]
    assert [r["status"] for r in rows] == ["finished", "finished", "failed (exit 1)", "incomplete", "not run"]
    assert rows[0]["steps"] == 10 and rows[0]["loss"] == 2.2 and rows[0]["eval"] == {
        "eval_loss": 1.5, "eval_mean_token_accuracy": 0.6}
    assert rows[3]["steps"] == 5 and rows[3]["loss"] == 1.0  # from its newest checkpoint
    assert rows[0]["overrides"] == {"training.learning_rate": 2}


def test_report_metric_direction_and_text_table(sweep_dir):
    higher = reports.report(str(sweep_dir), "eval_mean_token_accuracy")
    assert higher["better"] == "higher"
    assert [r["variant"] for r in higher["variants"]][:2] == ["v01-lr=2", "v00-lr=1"]
    by_loss = reports.report(str(sweep_dir), "loss")  # the final training loss: the unfinished run is best
    assert [r["variant"] for r in by_loss["variants"]][:3] == ["v03-lr=4", "v00-lr=1", "v01-lr=2"]
    text = cli("sweep_report", sweep_dir).stdout.splitlines()
    assert text[0].endswith("5 variants, ranked by eval_loss (lower is better)")
    assert text[1].split() == ["#", "variant", "steps", "loss", "eval_loss", "status", "overrides"]
    assert text[2].split() == ["1", "v01-lr=2", "10/10", "2.2", "1.5", "finished", "training.learning_rate=2"]
    assert text[4].split()[:3] == ["-", "v02-lr=3", "-"] and "failed (exit 1)" in text[4]
    # one plot compares the variants: eval_loss against the step, a line per variant that logged it
    assert text[-1] == f"curves:        {sweep_dir / 'curves.png'}"
    from PIL import Image

    assert Image.open(sweep_dir / "curves.png").format == "PNG"


def test_report_refuses_unknown_metric_and_missing_sweep(sweep_dir, tmp_path):
    result = cli("sweep_report", sweep_dir, "--metric", "eval_los")
    assert result.returncode == 2 and "no variant logged 'eval_los'; logged: eval_loss" in result.stderr
    result = cli("sweep_report", tmp_path / "nowhere")
    assert result.returncode == 2 and "no sweep.json here" in result.stderr
