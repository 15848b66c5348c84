//! `docs/broker-safety.md` and the code list the same findings: the page's table is generated from
//! `Reason` (rerun with `UPDATE_DOCS=1` after changing a reason), and every reason has its own
//! section explaining why it loses tasks and how to fix it.

use std::path::PathBuf;

use celery_broker::Reason;
use celery_broker::safety::findings_table;

const BEGIN: &str = "<!-- findings-table:begin -->\n";
const END: &str = "<!-- findings-table:end -->";

fn page_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/broker-safety.md")
}

#[test]
fn the_findings_table_in_the_docs_is_the_one_the_code_generates() {
    let page = std::fs::read_to_string(page_path()).expect("docs/broker-safety.md exists");
    let start = page.find(BEGIN).expect("the table's begin marker") + BEGIN.len();
    let end = page.find(END).expect("the table's end marker");
    let generated = findings_table();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(page_path(), format!("{}{generated}{}", &page[..start], &page[end..])).unwrap();
        return;
    }
    assert!(
        page[start..end] == generated,
        "docs/broker-safety.md lists other findings than the code: rerun with UPDATE_DOCS=1 and review the diff"
    );
}

#[test]
fn every_finding_has_a_section_and_every_section_a_finding() {
    let page = std::fs::read_to_string(page_path()).unwrap();
    let details = page.split("## Findings in detail").nth(1).expect("a 'Findings in detail' part");
    let details = details.split("\n## ").next().unwrap_or_default();
    let sections: Vec<&str> = details.lines().filter_map(|l| l.strip_prefix("### ")).map(str::trim).collect();
    let reasons: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
    let undocumented: Vec<&&str> = reasons.iter().filter(|r| !sections.contains(r)).collect();
    let stale: Vec<&&str> = sections.iter().filter(|s| !reasons.contains(s)).collect();
    assert!(undocumented.is_empty(), "findings without a section in docs/broker-safety.md: {undocumented:?}");
    assert!(stale.is_empty(), "sections for findings the code does not have: {stale:?}");
    // The JSON output links to these anchors.
    for reason in Reason::ALL {
        assert!(reason.docs_url().ends_with(&format!("docs/broker-safety.md#{}", reason.as_str().to_lowercase())));
    }
}
