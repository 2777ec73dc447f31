//! Tables for people, JSON for scripts (`--format json`: one array for a
//! listing, one object for inspect; snake_case fields).

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Prints `rows` as JSON, or as a table with `columns` (header, JSON key).
pub fn list(format: Format, rows: &[Value], columns: &[(&str, &str)]) {
    match format {
        Format::Json => println!("{}", Value::Array(rows.to_vec())),
        Format::Table => {
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| columns.iter().map(|(_, k)| cell(&r[*k])).collect())
                .collect();
            let mut widths: Vec<usize> = columns.iter().map(|(h, _)| h.len()).collect();
            for row in &cells {
                for (w, c) in widths.iter_mut().zip(row) {
                    *w = (*w).max(c.len());
                }
            }
            let line = |vals: Vec<&str>| {
                let s: Vec<String> = vals.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
                println!("{}", s.join("  ").trim_end());
            };
            line(columns.iter().map(|(h, _)| *h).collect());
            for row in &cells {
                line(row.iter().map(String::as_str).collect());
            }
        }
    }
}

/// Prints one object (inspect): always JSON, pretty on a terminal.
pub fn object(format: Format, v: &Value) {
    match format {
        Format::Json => println!("{v}"),
        Format::Table => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "*".into() } else { String::new() },
        Value::Object(m) => m.iter().map(|(k, v)| format!("{k}={}", cell(v))).collect::<Vec<_>>().join(","),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}
