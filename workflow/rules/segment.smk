# Segmentation evaluation (subjects whose sheet gives a label map): every reconstruction, and the
# ground-truth volume itself as the method "ground_truth" (the segmenter's own ceiling), is
# segmented into the FeTA structures and scored against the labels (Dice, HD95, ASSD).


def segmentation_volume(wildcards):
    if wildcards.method == "ground_truth":
        return subject_path("volume")(wildcards)
    return f"results/{wildcards.subject}/{wildcards.method}/volume.nii.gz"


rule segment:
    input:
        volume=segmentation_volume,
    output:
        "results/{subject}/{method}/labels.nii.gz",
    params:
        settings=config.get("segmentation"),
    log:
        "logs/{subject}/{method}/segment.log",
    benchmark:
        "benchmarks/{subject}/{method}/segment.tsv"
    threads: 2
    conda:
        "../../envs/segment.yaml"
    script:
        "../scripts/segment.py"


def segmentation_scoring(wildcards):
    """The label map and the truth; for a reconstruction also its volume, the reference and the mask, whose
    registration carries the labels onto the truth (the ground truth's own labels need none)."""
    files = {"labels": f"results/{wildcards.subject}/{wildcards.method}/labels.nii.gz",
             "truth": subject_path("labels")(wildcards)}
    if wildcards.method != "ground_truth":
        files.update(volume=segmentation_volume(wildcards), reference=subject_path("volume")(wildcards),
                     mask=subject_path("mask")(wildcards))
    return files


rule evaluate_segmentation:
    input:
        unpack(segmentation_scoring),
    output:
        "results/{subject}/{method}/segmentation.tsv",
    params:
        settings=config.get("segmentation"),
    log:
        "logs/{subject}/{method}/evaluate_segmentation.log",
    threads: 1
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/evaluate_segmentation.py"


rule aggregate_segmentation:
    input:
        scores=expand("results/{subject}/{method}/segmentation.tsv", subject=SEGMENTED, method=["ground_truth"] + METHODS),
    output:
        per_subject=report("results/tables/segmentation_per_subject.csv", caption="../report/segmentation.rst", category="Tables"),
        table="results/tables/segmentation.md",
    params:
        subjects=SEGMENTED,
        methods=["ground_truth"] + METHODS,
        not_installed=NOT_INSTALLED,
    log:
        "logs/aggregate_segmentation.log",
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/segmentation_table.py"
