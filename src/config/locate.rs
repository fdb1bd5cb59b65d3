//! Maps byte offsets in a TOML document to `line:col` and to key paths, and removes the
//! entry at an offset so that deserialization can go on past a bad value.

use std::ops::Range;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before
        .get(line_start..)
        .map_or(1, |s| s.chars().count() + 1);
    (line, col)
}

fn contains(span: &Range<usize>, pos: usize) -> bool {
    span.start <= pos && pos < span.end.max(span.start + 1)
}

/// The key path (`pools.web.servers[0].address`) of the deepest entry at `pos`.
pub fn path_at(root: &DeTable<'_>, pos: usize) -> String {
    let mut path = String::new();
    table_path(root, pos, &mut path);
    if path.is_empty() {
        path.push_str("(root)");
    }
    path
}

fn push_key(path: &mut String, key: &str) {
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
}

fn table_path(table: &DeTable<'_>, pos: usize, path: &mut String) -> bool {
    for (k, v) in table.iter() {
        if contains(&k.span(), pos) {
            push_key(path, k.get_ref());
            return true;
        }
        if contains(&v.span(), pos) || inside(v, pos) {
            push_key(path, k.get_ref());
            value_path(v, pos, path);
            return true;
        }
    }
    false
}

fn value_path(v: &Spanned<DeValue<'_>>, pos: usize, path: &mut String) {
    match v.get_ref() {
        DeValue::Table(t) => {
            table_path(t, pos, path);
        }
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                if contains(&item.span(), pos) || inside(item, pos) {
                    path.push_str(&format!("[{i}]"));
                    value_path(item, pos, path);
                    return;
                }
            }
        }
        _ => {}
    }
}

/// Whether `pos` lies inside a table or array whose own span does not cover its contents
/// (a `[section]` header's span covers the header only).
fn inside(v: &Spanned<DeValue<'_>>, pos: usize) -> bool {
    match v.get_ref() {
        DeValue::Table(t) => t
            .iter()
            .any(|(k, v)| contains(&k.span(), pos) || contains(&v.span(), pos) || inside(v, pos)),
        DeValue::Array(items) => items
            .iter()
            .any(|i| contains(&i.span(), pos) || inside(i, pos)),
        _ => false,
    }
}

/// Removes the deepest table entry at `pos`. Returns false when none covers it.
pub fn remove_at(table: &mut DeTable<'_>, pos: usize) -> bool {
    let mut hit = None;
    for (k, v) in table.iter_mut() {
        if contains(&k.span(), pos) {
            hit = Some(k.get_ref().to_string());
            break;
        }
        if contains(&v.span(), pos) || inside(v, pos) {
            if remove_in_value(v.get_mut(), pos) {
                return true;
            }
            hit = Some(k.get_ref().to_string());
            break;
        }
    }
    match hit {
        Some(key) => table.remove(key.as_str()).is_some(),
        None => false,
    }
}

fn remove_in_value(v: &mut DeValue<'_>, pos: usize) -> bool {
    match v {
        DeValue::Table(t) => remove_at(t, pos),
        DeValue::Array(items) => {
            for item in items.iter_mut() {
                if contains(&item.span(), pos) || inside(item, pos) {
                    if let DeValue::Table(t) = item.get_mut() {
                        return remove_at(t, pos);
                    }
                    return false;
                }
            }
            false
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let t = "a = 1\nbb = 2\n";
        assert_eq!(line_col(t, 0), (1, 1));
        assert_eq!(line_col(t, 6), (2, 1));
        assert_eq!(line_col(t, 11), (2, 6));
        assert_eq!(line_col(t, 999), (3, 1));
    }

    #[test]
    fn path_and_removal_follow_sections_and_arrays() {
        let t = "[pools.web]\nservers = [{ address = \"x\" }]\n[[class]]\nname = \"a\"\n[[class]]\nname = \"b\"\n";
        let root = DeTable::parse(t).expect("valid toml").into_inner();
        let pos = t.find("\"x\"").expect("present");
        assert_eq!(path_at(&root, pos), "pools.web.servers[0].address");
        let pos_b = t.find("\"b\"").expect("present");
        assert_eq!(path_at(&root, pos_b), "class[1].name");
        let mut root = root;
        assert!(remove_at(&mut root, pos_b));
        assert_eq!(path_at(&root, pos_b), "(root)");
    }
}
