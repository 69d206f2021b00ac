import pandas as pd
from pathlib import Path
from snakemake.utils import validate

# gsvr is the package installed in Snakemake's environment (`pip install -e .`, README); the workflow
# sets no paths. Jobs import the same code: without --sdm conda they run this environment's Python; under
# --sdm conda (envs/*.yaml hold only third-party packages) Snakemake's preamble of each `script:` appends
# this process's sys.path, where the editable install puts the checkout's src/, to the job's sys.path.
# (Snakemake removes PYTHONPATH from conda jobs' environment, so exporting it would not reach them.)
try:
    from gsvr.baselines.external import PROGRAMS, ExternalSettings, availability
    from gsvr.recon.plan import auto_means_cuda, check_methods, memory_mb, runtime_min, uses_cuda
except ModuleNotFoundError as _exc:
    if _exc.name != "gsvr":
        raise
    raise ModuleNotFoundError("the workflow needs gsvr in Snakemake's Python environment: pip install -e . (README)") from _exc

validate(config, "../schemas/config.schema.yaml")


def _read_sheet(path, schema):
    sheet = pd.read_csv(path, sep="\t", dtype=str, comment="#").set_index("subject", drop=False)
    validate(sheet, schema)
    return sheet


def _resolve(sheet_path, value):
    p = Path(value)
    return str(p if p.is_absolute() else Path(sheet_path).parent / p)


# Subjects with ground truth: stacks are simulated from their volumes; metrics against the volume.
_sheet = Path(config["subjects"])
SUBJECTS = _read_sheet(_sheet, "../schemas/subjects.schema.yaml")
# Acquired subjects: stacks, masks and thicknesses as given; no ground truth, so their chains report
# leave-one-stack-out self-consistency (gsvr assess) instead of the ground-truth metrics.
_acquired_sheet = Path(config["acquired"]) if config.get("acquired") else None
ACQUIRED = (_read_sheet(_acquired_sheet, "../schemas/acquired.schema.yaml") if _acquired_sheet
            else pd.DataFrame(columns=["subject", "dataset", "stacks", "masks", "thicknesses"]).set_index("subject", drop=False))
# Every method's settings (engine and the engine's settings) are checked now, when Snakemake parses
# the workflow: a typo fails `snakemake -n` with a message naming methods.<name>, before any job runs.
METHOD_SETTINGS = check_methods(config["methods"])  # name -> (engine, parsed settings)
# Whether run.device: auto means CUDA for the jobs (they ask for a GPU then): auto_device, where "detect"
# asks torch in this process, i.e. on the host that plans the jobs (the submit host under SLURM).
AUTO_IS_CUDA = auto_means_cuda(config.get("auto_device", "detect"))
# External tools (engine nesvor|svrtk|niftymic) that are not installed are left out of the chains and
# listed in the tables as "not installed", with the reason.
NOT_INSTALLED = {m: why for m, (_, s) in METHOD_SETTINGS.items() if isinstance(s, ExternalSettings) and (why := availability(s))}
METHODS = [m for m in config["methods"] if m not in NOT_INSTALLED]
ASSESS_METHODS = [m for m in config.get("assess_methods", METHODS) if m not in NOT_INSTALLED]

# Subjects given a label map in the sheet get the segmentation evaluation (when `segmentation:` is set).
SEGMENTED = ([s for s in SUBJECTS.index if "labels" in SUBJECTS and not pd.isna(SUBJECTS.loc[s, "labels"])]
             if config.get("segmentation") else [])
ABLATIONS = sorted(config.get("ablations") or {}) if len(SUBJECTS) else []
for _name in ABLATIONS:
    _unknown = sorted(set(config["ablations"][_name].values()) - set(METHODS))
    if _unknown:
        raise ValueError(f"ablations.{_name} names methods that are not configured (or not installed): {', '.join(_unknown)}")
if "ground_truth" in config["methods"]:
    raise ValueError("methods: 'ground_truth' is reserved (the segmentation table's row for the ground truth itself)")

_both = sorted(set(SUBJECTS.index) & set(ACQUIRED.index))
if _both:
    raise ValueError(f"subject ids in both {_sheet} and {_acquired_sheet}: {', '.join(_both)}")
_unknown = sorted(set(config.get("assess_methods", [])) - set(config["methods"]))
if _unknown:
    raise ValueError(f"assess_methods names methods not in methods: {', '.join(_unknown)}")
_external = sorted(m for m in config.get("assess_methods", []) if METHOD_SETTINGS[m][0] in PROGRAMS)
if _external:
    raise ValueError(f"assess_methods: gsvr assess reconstructs with gsvr's own methods only, not {', '.join(_external)}")


def _words(subject, column):
    value = ACQUIRED.loc[subject, column]
    return [] if pd.isna(value) else str(value).split()


for _s in ACQUIRED.index:
    _n = len(_words(_s, "stacks"))
    for _c in ("masks", "thicknesses"):
        if _words(_s, _c) and len(_words(_s, _c)) != _n:
            raise ValueError(f"{_acquired_sheet}: subject {_s} has {_n} stacks but {len(_words(_s, _c))} {_c}")
    if not _words(_s, "masks"):
        raise ValueError(f"{_acquired_sheet}: subject {_s} needs one brain mask per stack")


def subject_path(column):
    """Path from the subject sheet, relative to the sheet's folder unless absolute."""

    def get(wildcards):
        return _resolve(_sheet, SUBJECTS.loc[wildcards.subject, column])

    return get


def acquired_paths(column):
    """Space-separated paths of an acquired subject (stacks or masks), relative to the sheet unless absolute."""

    def get(wildcards):
        return [_resolve(_acquired_sheet, p) for p in _words(wildcards.subject, column)]

    return get


def thicknesses(wildcards):
    """Slice thickness of each stack: the simulation protocol's, or the acquired sheet's (None: each
    stack's slice spacing)."""
    if wildcards.subject not in ACQUIRED.index:
        return [float(config["simulation"]["thickness_mm"])] * int(config["simulation"]["n_stacks"])
    values = [float(v) for v in _words(wildcards.subject, "thicknesses")]
    return values or None


def preprocessed(wildcards):
    """The preprocessed stacks of a subject: files for a simulated subject, a folder for an acquired one."""
    if wildcards.subject in ACQUIRED.index:
        return {"stacks": f"results/{wildcards.subject}/pre_acquired"}
    n = range(int(config["simulation"]["n_stacks"]))
    return {"stacks": [f"results/{wildcards.subject}/pre/stack{k}.nii.gz" for k in n],
            "masks": [f"results/{wildcards.subject}/pre/stack{k}_mask.nii.gz" for k in n]}

