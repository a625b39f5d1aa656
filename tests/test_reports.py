import pytest

from xgem_dist.data.reports import select_section, split_sections

REPORT = """
                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 
 INDICATION:  ___ with cough
 
 COMPARISON:  Chest radiograph from ___.
 
 FINDINGS: 
 
 Heart size is normal.  Lungs are clear.
 
 IMPRESSION: 
 
 No acute cardiopulmonary process.
"""


def test_real_mimic_report_gives_its_impression(realdata):
    text = (realdata / "reports" / "mimic_cxr_example_s00000000.txt").read_text()
    assert select_section(text) == ("Large left pleural effusion", "impression")
    names = [name for name, _ in split_sections(text)]
    assert names == ["preamble", "examination", "indication", "technique", "comparison", "findings", "impression"]


def test_priority_impression_then_findings_then_last_paragraph_then_comparison():
    assert select_section(REPORT) == ("No acute cardiopulmonary process.", "impression")
    no_impression = REPORT.split(" IMPRESSION:")[0]
    assert select_section(no_impression) == ("Heart size is normal. Lungs are clear.", "findings")
    neither = REPORT.split(" FINDINGS:")[0] + " \n The lungs are clear.  No effusion.\n"
    assert select_section(neither) == ("The lungs are clear. No effusion.", "last_paragraph")
    only_comparison = "\n COMPARISON:  Prior study.\n"
    assert select_section(only_comparison) == ("Prior study.", "comparison")


def test_synonyms_empty_sections_and_named_choice():
    text = REPORT.replace("IMPRESSION:", "CONCLUSION:")
    assert select_section(text)[1] == "impression"
    empty_impression = REPORT.split(" IMPRESSION:")[0] + " IMPRESSION:  \n \n"
    assert select_section(empty_impression)[1] == "findings"
    assert select_section(REPORT, "findings") == ("Heart size is normal. Lungs are clear.", "findings")
    assert select_section(REPORT.split(" FINDINGS:")[0], "findings") == ("", None)
    full, name = select_section(REPORT, "full")
    assert name == "full" and full.startswith("FINAL REPORT EXAMINATION:") and full.endswith("process.")


def test_addendum_before_the_final_report_keeps_the_final_impression():
    text = "\n ADDENDUM:  Called to Dr. ___.\n " + "_" * 78 + REPORT
    assert select_section(text) == ("No acute cardiopulmonary process.", "impression")


def test_report_without_headers_is_one_section():
    assert split_sections("no headers at all") == [("full report", "no headers at all")]
    assert select_section("no headers at all") == ("", None)


@pytest.mark.parametrize("section", ["auto", "impression", "findings", "full"])
def test_selected_text_has_no_layout_whitespace(section):
    text, _ = select_section(REPORT, section)
    assert "\n" not in text and "  " not in text
