//! A YAML document as a small tree whose every node remembers the file and
//! line it came from, built from yaml-rust2's parser events; and the merge
//! of one such tree over another (`-c base.yml -c override.yml`).
//!
//! Scalars stay strings: a field's converter decides whether `3` is a
//! number, so `replicas: ${N}` works after interpolation and `"3"` and `3`
//! mean the same, as in Docker. Anchors, aliases and `<<` merge keys are
//! resolved here; tags other than YAML's own (`!!str`) are refused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;

use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use crate::error::ComposeError;

/// A compose file: its name as the operator gave it (for messages) and
/// its directory (relative paths in it are relative to that).
#[derive(Debug)]
pub struct Source {
    pub name: String,
    pub dir: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub src: Rc<Source>,
    pub line: usize,
    pub value: Value,
}

#[derive(Clone, Debug)]
pub enum Value {
    /// `~`, `null`, or nothing (`key:`).
    Null,
    Scalar(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub key: Key,
    pub value: Node,
}

#[derive(Clone, Debug)]
pub struct Key {
    pub name: String,
    pub src: Rc<Source>,
    pub line: usize,
}

impl Node {
    /// What the node is, for "expected X, found Y" messages.
    pub fn describe(&self) -> String {
        match &self.value {
            Value::Null => "nothing (null)".into(),
            Value::Scalar(s) => format!("{s:?}"),
            Value::Seq(_) => "a list".into(),
            Value::Map(_) => "a mapping".into(),
        }
    }

    #[cfg(test)]
    pub fn get(&self, key: &str) -> Option<&Entry> {
        match &self.value {
            Value::Map(entries) => entries.iter().find(|e| e.key.name == key),
            _ => None,
        }
    }
}

/// Parses one compose file's text into a tree. The root must be a mapping.
pub fn parse(src: Rc<Source>, text: &str) -> Result<Node, ComposeError> {
    let mut b = Builder { parser: Parser::new_from_str(text), src, anchors: HashMap::new() };
    let (ev, mark) = b.next()?;
    if ev != Event::StreamStart {
        return Err(b.err(mark, "expected the start of the stream".into()));
    }
    let (ev, mark) = b.next()?;
    let root = match ev {
        // An empty file: an empty mapping, caught later as "no services".
        Event::StreamEnd => return Ok(Node { src: b.src.clone(), line: 1, value: Value::Map(Vec::new()) }),
        Event::DocumentStart => {
            let (ev, mark) = b.next()?;
            b.node(ev, mark)?
        }
        _ => return Err(b.err(mark, "expected a document".into())),
    };
    let (ev, mark) = b.next()?;
    if ev != Event::DocumentEnd {
        return Err(b.err(mark, "expected the end of the document".into()));
    }
    let (ev, mark) = b.next()?;
    if ev != Event::StreamEnd {
        return Err(b.err(mark, "more than one YAML document: a compose file holds exactly one".into()));
    }
    match root.value {
        Value::Map(_) => Ok(root),
        Value::Null => Ok(Node { value: Value::Map(Vec::new()), ..root }),
        _ => Err(b.err_line(root.line, format!("the top level must be a mapping, found {}", root.describe()))),
    }
}

struct Builder<'a> {
    parser: Parser<std::str::Chars<'a>>,
    src: Rc<Source>,
    anchors: HashMap<usize, Node>,
}

impl Builder<'_> {
    fn next(&mut self) -> Result<(Event, Marker), ComposeError> {
        self.parser.next_token().map_err(|e| ComposeError::Yaml {
            file: self.src.name.clone(),
            line: e.marker().line(),
            message: e.info().to_string(),
        })
    }

    fn err(&self, mark: Marker, message: String) -> ComposeError {
        self.err_line(mark.line(), message)
    }

    fn err_line(&self, line: usize, message: String) -> ComposeError {
        ComposeError::Yaml { file: self.src.name.clone(), line, message }
    }

    fn check_tag(&self, tag: &Option<Tag>, mark: Marker) -> Result<(), ComposeError> {
        match tag {
            None => Ok(()),
            // YAML's own types (`!!str 8080`): the converters read every
            // scalar as text anyway.
            Some(t) if t.handle == "tag:yaml.org,2002:" || t.handle == "!!" => Ok(()),
            Some(t) => Err(self.err(mark, format!("YAML tag {}{} is not supported", t.handle, t.suffix))),
        }
    }

    fn remember(&mut self, anchor: usize, node: &Node) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
    }

    fn node(&mut self, ev: Event, mark: Marker) -> Result<Node, ComposeError> {
        let line = mark.line();
        match ev {
            Event::Scalar(v, style, anchor, tag) => {
                self.check_tag(&tag, mark)?;
                let null = style == TScalarStyle::Plain && tag.is_none() && matches!(v.as_str(), "" | "~" | "null" | "Null" | "NULL");
                let node = Node { src: self.src.clone(), line, value: if null { Value::Null } else { Value::Scalar(v) } };
                self.remember(anchor, &node);
                Ok(node)
            }
            Event::SequenceStart(anchor, tag) => {
                self.check_tag(&tag, mark)?;
                let mut items = Vec::new();
                loop {
                    let (ev, mark) = self.next()?;
                    if ev == Event::SequenceEnd {
                        break;
                    }
                    items.push(self.node(ev, mark)?);
                }
                let node = Node { src: self.src.clone(), line, value: Value::Seq(items) };
                self.remember(anchor, &node);
                Ok(node)
            }
            Event::MappingStart(anchor, tag) => {
                self.check_tag(&tag, mark)?;
                let node = Node { src: self.src.clone(), line, value: Value::Map(self.mapping()?) };
                self.remember(anchor, &node);
                Ok(node)
            }
            Event::Alias(id) => self
                .anchors
                .get(&id)
                .cloned()
                .ok_or_else(|| self.err(mark, "alias to an unknown anchor".into())),
            other => Err(self.err(mark, format!("unexpected {other:?}"))),
        }
    }

    /// The entries of a mapping up to its end, with `<<` merge keys
    /// resolved: explicit keys win over merged ones, and among merged
    /// mappings the first listed wins (YAML's merge-key rules).
    fn mapping(&mut self) -> Result<Vec<Entry>, ComposeError> {
        let mut entries: Vec<Entry> = Vec::new();
        let mut merged: Vec<Entry> = Vec::new();
        loop {
            let (ev, mark) = self.next()?;
            let (name, plain) = match ev {
                Event::MappingEnd => break,
                Event::Scalar(v, style, _, tag) => {
                    self.check_tag(&tag, mark)?;
                    (v, style == TScalarStyle::Plain)
                }
                _ => return Err(self.err(mark, "mapping keys must be strings".into())),
            };
            let key = Key { name, src: self.src.clone(), line: mark.line() };
            let (ev, vmark) = self.next()?;
            let mut value = self.node(ev, vmark)?;
            // A scalar's line is its key's: an empty value's marker points at
            // the next line, a block scalar's at its first content line.
            if matches!(value.value, Value::Null | Value::Scalar(_)) {
                value.line = key.line;
            }
            if plain && key.name == "<<" {
                let sources = match value.value {
                    Value::Map(m) => vec![m],
                    Value::Seq(items) => {
                        let mut maps = Vec::new();
                        for item in items {
                            match item.value {
                                Value::Map(m) => maps.push(m),
                                _ => return Err(self.err_line(key.line, "a merge key (<<) takes mappings".into())),
                            }
                        }
                        maps
                    }
                    _ => return Err(self.err_line(key.line, "a merge key (<<) takes a mapping or a list of mappings".into())),
                };
                for m in sources {
                    for e in m {
                        if !merged.iter().any(|x| x.key.name == e.key.name) {
                            merged.push(e);
                        }
                    }
                }
                continue;
            }
            if entries.iter().any(|e| e.key.name == key.name) {
                return Err(self.err_line(key.line, format!("duplicate key {:?}", key.name)));
            }
            entries.push(Entry { key, value });
        }
        for e in merged {
            if !entries.iter().any(|x| x.key.name == e.key.name) {
                entries.push(e);
            }
        }
        Ok(entries)
    }
}

/// `over` on top of `base`: mappings merge key by key, recursively;
/// anything else (scalars, lists, a mapping against a non-mapping) is
/// replaced by `over`'s value.
pub fn merge(base: Node, over: Node) -> Node {
    match (base.value, over.value) {
        (Value::Map(mut a), Value::Map(b)) => {
            for e in b {
                match a.iter().position(|x| x.key.name == e.key.name) {
                    Some(i) => {
                        let old = std::mem::replace(&mut a[i].value, Node { src: e.value.src.clone(), line: 0, value: Value::Null });
                        a[i] = Entry { key: e.key, value: merge(old, e.value) };
                    }
                    None => a.push(e),
                }
            }
            Node { src: over.src, line: over.line, value: Value::Map(a) }
        }
        (_, value) => Node { src: over.src, line: over.line, value },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(name: &str) -> Rc<Source> {
        Rc::new(Source { name: name.into(), dir: PathBuf::from("/x") })
    }

    #[test]
    fn lines_nulls_anchors_merge_keys() {
        let text = "a: 1\nb:\nc: |\n  text\nbase: &base\n  k: v\n  j: w\nd:\n  <<: *base\n  j: mine\n";
        let n = parse(src("f.yml"), text).unwrap();
        assert_eq!(n.get("a").unwrap().value.line, 1);
        assert!(matches!(n.get("b").unwrap().value.value, Value::Null));
        assert_eq!(n.get("b").unwrap().value.line, 2);
        assert_eq!(n.get("c").unwrap().value.line, 3);
        let d = &n.get("d").unwrap().value;
        let Value::Scalar(k) = &d.get("k").unwrap().value.value else { panic!() };
        assert_eq!(k, "v");
        let Value::Scalar(j) = &d.get("j").unwrap().value.value else { panic!() };
        assert_eq!(j, "mine");
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let e = parse(src("f.yml"), "a: b\n  c: d\n").unwrap_err().to_string();
        assert!(e.starts_with("f.yml:2: invalid YAML"), "{e}");
        let e = parse(src("f.yml"), "a: 1\na: 2\n").unwrap_err().to_string();
        assert_eq!(e, "f.yml:2: invalid YAML: duplicate key \"a\"");
        let e = parse(src("f.yml"), "- a\n").unwrap_err().to_string();
        assert!(e.contains("top level must be a mapping"), "{e}");
        let e = parse(src("f.yml"), "a: !reset []\n").unwrap_err().to_string();
        assert!(e.contains("tag !reset"), "{e}");
    }

    #[test]
    fn merge_maps_recursively_replace_the_rest() {
        let a = parse(src("a.yml"), "s:\n  web:\n    image: x\n    ports: [\"80:80\"]\n").unwrap();
        let b = parse(src("b.yml"), "s:\n  web:\n    ports: [\"81:81\"]\n    replicas: 2\n").unwrap();
        let m = merge(a, b);
        let web = &m.get("s").unwrap().value.get("web").unwrap().value;
        assert_eq!(web.get("image").unwrap().value.src.name, "a.yml");
        let ports = &web.get("ports").unwrap().value;
        assert_eq!(ports.src.name, "b.yml");
        let Value::Seq(items) = &ports.value else { panic!() };
        assert_eq!(items.len(), 1);
        assert!(web.get("replicas").is_some());
    }
}
