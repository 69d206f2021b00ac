import pandas as pd
from pathlib import Path
from snakemake.utils import validate

validate(config, "../schemas/config.schema.yaml")

_sheet = Path(config["subjects"])
SUBJECTS = pd.read_csv(_sheet, sep="\t", dtype=str, comment="#").set_index("subject", drop=False)
validate(SUBJECTS, "../schemas/subjects.schema.yaml")
METHODS = list(config["methods"])


def subject_path(column):
    """Path from the subject sheet, relative to the sheet's folder unless absolute."""

    def get(wildcards):
        p = Path(SUBJECTS.loc[wildcards.subject, column])
        return str(p if p.is_absolute() else _sheet.parent / p)

    return get
