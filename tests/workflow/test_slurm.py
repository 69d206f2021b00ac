"""The workflow through SLURM: the tiny run's quality table, for three of its methods, made with
`--profile workflow/profiles/slurm` on a real one-node cluster (tests/workflow/slurm/cluster.sh, started here as
root when it is not running). Every job goes
through sbatch, ends COMPLETED in SLURM's accounting, and the table's rows equal the local run's.

The SLURM run starts from the local run's simulated and preprocessed stacks, so its jobs are the reconstructions,
their evaluations and the table (5 jobs in 3 waves): each wave costs a job's own start of Snakemake, twice, and
the plugin's status checks on top of the work, and simulate and preprocess are one-thread jobs with the default
resources, submitted like evaluate and aggregate.

The command-line overrides are what the test cluster needs, nothing of the workflow's: its account and
partition (added to the profile's default resources), at most one thread per job as in the local run (the
profile asks 8 for reconstruct; the node has 2 CPUs, and equal threads give equal numbers), and the first status
check after 2 s instead of the plugin's 40 (its jobs last seconds).
"""
import os
import re
import shutil
import subprocess
from datetime import datetime, timedelta

import pandas as pd
import pytest
import yaml
from conftest import SLURM_METHODS
from test_workflow import ROOT, SNAKEMAKE

CLUSTER_SH = ROOT / "tests" / "workflow" / "slurm" / "cluster.sh"
STATE = os.environ.get("GSVR_SLURM_STATE", "/tmp/gsvr-slurm")
ACCOUNT = PARTITION = "gsvr"  # cluster.sh's
TARGET = "results/tables/quality.md"


def _cluster(command, env):
    return subprocess.run(["bash", str(CLUSTER_SH), command], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The environment of cluster.sh's cluster (SLURM_CONF), started for these tests (and stopped after them)
    unless it runs already."""
    env = {**os.environ, "GSVR_SLURM_STATE": STATE, "SLURM_CONF": f"{STATE}/slurm.conf"}
    if _cluster("status", env).returncode == 0:
        yield env
        return
    if os.geteuid() != 0:
        pytest.skip("the test SLURM cluster is not running and starting it needs root: "
                    "sudo bash tests/workflow/slurm/cluster.sh start")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and cluster.sh installs it with apt-get (Debian, Ubuntu), absent here")
    res = _cluster("start", env)
    assert res.returncode == 0, f"cluster.sh start failed:\n{res.stdout[-2000:]}{res.stderr[-3000:]}"
    try:
        yield env
    finally:
        _cluster("stop", env)


def _planned_jobs(out):
    """{rule: count} of the run's 'Job stats' table."""
    table = out.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.mark.slurm
@pytest.mark.slow
def test_the_slurm_profile_runs_every_job_through_sbatch_and_makes_the_local_runs_table(slurm_cluster, small_run,
                                                                                         slurm_cohort, tmp_path):
    slurm_cohort(tmp_path)
    for stage in ("sim", "pre"):  # copied after the inputs were written, so newer than them: Snakemake keeps them
        shutil.copytree(small_run / "results/tiny" / stage, tmp_path / "results/tiny" / stage, copy_function=shutil.copy)
    profile = ROOT / "workflow" / "profiles" / "slurm"
    defaults = yaml.safe_load((profile / "config.yaml").read_text()).get("default-resources") or {}
    res = subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--profile", str(profile),
         "--default-resources", *(f"{k}={v}" for k, v in defaults.items()), f"slurm_account={ACCOUNT}",
         f"slurm_partition={PARTITION}", "--max-threads", "1", "--slurm-init-seconds-before-status-checks", "2", TARGET],
        capture_output=True, text=True, env=slurm_cluster, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]

    # Every job Snakemake planned was submitted with sbatch; none ran in this process.
    planned = _planned_jobs(out)
    assert planned == {"reconstruct": 2, "evaluate": 2, "aggregate": 1}, planned
    submitted = re.findall(r"Job \d+ has been submitted with SLURM jobid (\d+)", out)
    assert len(submitted) == sum(planned.values()), out[-3000:]
    assert not re.search(r"^localrule ", out, re.M)
    # SLURM's accounting has each of them under the run's job name, with the rule and wildcards as the comment
    # (rule_<rule>_wildcards_<values>), in the cluster's account and partition, COMPLETED.
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)
    since = (datetime.now() - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    sacct = subprocess.run(["sacct", "-X", "-n", "-P", "--name", run_id, "-S", since,
                            "-o", "JobID,JobName,Comment,Account,Partition,State"],
                           capture_output=True, text=True, env=slurm_cluster, timeout=60)
    assert sacct.returncode == 0, sacct.stderr
    rows = [line.split("|") for line in sacct.stdout.splitlines() if line]
    assert sorted(r[0] for r in rows) == sorted(submitted), sacct.stdout
    assert all(r[1:] == [run_id, r[2], ACCOUNT, PARTITION, "COMPLETED"] for r in rows), sacct.stdout
    rules = {}
    for r in rows:
        rule = re.fullmatch(r"rule_(\w+?)(_wildcards_.*)?", r[2]).group(1)
        rules[rule] = rules.get(rule, 0) + 1
    assert rules == planned, (rules, planned)
    assert "rule_reconstruct_wildcards_tiny_gsvr" in {r[2] for r in rows}

    # The same numbers as the local run (same settings, same threads) for the methods run here; only the wall
    # times differ, and which row is best in a column (in bold) among fewer methods.
    local = pd.read_csv(small_run / "results/tables/per_subject.csv").drop(columns="time_s")
    local = local[local["method"].isin(SLURM_METHODS)].reset_index(drop=True)
    slurm = pd.read_csv(tmp_path / "results/tables/per_subject.csv").drop(columns="time_s")
    assert len(slurm) == 2
    pd.testing.assert_frame_equal(slurm, local)

    def rows(md):  # method -> its quality-table row, without the wall time (last column) and the bold
        lines = [re.sub(r"\| [*\d.]+ \|$", "| |", line.replace("**", "")) for line in md.splitlines() if line.startswith("| ")]
        return {line.split("|")[1].strip(): line for line in lines}

    mine, theirs = rows((tmp_path / TARGET).read_text()), rows((small_run / TARGET).read_text())
    assert set(SLURM_METHODS) <= set(mine), mine
    assert all(theirs.get(method) == line for method, line in mine.items()), (mine, theirs)
