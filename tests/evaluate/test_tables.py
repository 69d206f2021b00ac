import pandas as pd
import pytest

from gsvr.evaluate.tables import ablation_table


def test_the_ablation_table_averages_subjects_and_differences_against_the_first_row(tmp_path):
    rows = [dict(subject=s, method=m, psnr=p, ssim=q, ncc=0.9, nrmse=0.1, time_s=10.0)
            for s, m, p, q in [("a", "full", 30.0, 0.95), ("b", "full", 32.0, 0.97), ("a", "noX", 28.0, 0.93), ("b", "noX", 29.0, 0.94)]]
    csv = tmp_path / "per_subject.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    out = ablation_table(str(csv), {"full model": "full", "w/o X": "noX"}, table_md=str(tmp_path / "t.md"), title="x")
    assert out.set_index("variant").loc["w/o X", "d_psnr"] == pytest.approx(28.5 - 31.0)
    assert out.set_index("variant").loc["full model", "d_psnr"] == 0.0
    text = (tmp_path / "t.md").read_text()
    assert "| w/o X | noX | 28.50 | 0.9350 | 0.900 | 10.0 | -2.50 | -0.0250 |" in text
    with pytest.raises(ValueError, match="nosuch"):
        ablation_table(str(csv), {"full": "full", "typo": "nosuch"}, table_md=str(tmp_path / "u.md"))
    assert not (tmp_path / "u.md").exists()
