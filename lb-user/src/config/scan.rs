//! Passes over the YAML events of a configuration. The first, [`check`], before serde_yaml reads
//! the document: it refuses what would make deserialisation slow or huge, and reports syntax
//! errors and duplicate keys where they are written. The second, [`locate`], only once
//! validation has an error to place: it records every node's position ([`Locator`]), which a
//! valid configuration never needs.
//!
//! Why a pass of its own: serde_yaml 0.9 copies the node an alias names at every alias while it
//! deserialises, with no bound (3,000 aliases of a 1 MiB string took gigabytes and half a
//! minute), and its parser, libyaml, takes time quadratic in the depth of flow collections
//! (`[[[[...]]]]`: each token rescans one pending simple key per open level; 100,000 levels
//! took 40 s). yaml-rust2's parser streams events and gives up beyond 255 levels of flow
//! collections, so this pass stops early, and serde_yaml only ever sees a document within
//! [`MAX_DEPTH`] and [`MAX_ALIAS_EXPANSION`].
use super::locate::{Locator, Node, Shape};
use super::{ConfigError, ConfigErrors};
use std::collections::{hash_map::Entry, HashMap};
use yaml_rust2::parser::{Event, Parser};

/// The deepest nesting of collections (aliases included). lb's own deepest is 7
/// (`backends[0].servers[0].tls.client_cert.cert`); serde_yaml stops at 128 anyway.
const MAX_DEPTH: usize = 64;

/// The most that aliases may add to a document, in bytes of the scalars they repeat plus one
/// per node (so that aliases of empty collections count too). As much as the largest file
/// lb reads ([`super::input::MAX_FILE_BYTES`]): sharing even a list of thousands of servers
/// between backends stays far below it, and what serde_yaml builds from a document stays
/// within about twice what it builds from the largest file.
const MAX_ALIAS_EXPANSION: u64 = super::input::MAX_FILE_BYTES;

/// Line and column, 1-based.
type At = (usize, usize);

/// Refuses a document serde_yaml should not read: a syntax error, a duplicate key (all of
/// them are reported), nesting deeper than [`MAX_DEPTH`], aliases past [`MAX_ALIAS_EXPANSION`].
pub(crate) fn check(file: &str, source: &str) -> Result<(), ConfigErrors> {
    let mut scan = Scan::default();
    let end = scan.events(source);
    let mut found = std::mem::take(&mut scan.duplicates);
    // Duplicate keys before an error are independent of it: report them too.
    found.extend(end.err());
    if found.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(
            found
                .into_iter()
                .map(|((line, column), message)| ConfigError::at(file, line, column, message))
                .collect(),
        ))
    }
}

/// Where each node of a document that passed [`check`] is.
pub(crate) fn locate(source: &str) -> Locator {
    let mut scan = Scan {
        locator: Some(Locator::default()),
        ..Scan::default()
    };
    // Cannot fail after `check`; positions up to an error would still be right.
    let _ = scan.events(source);
    scan.locator.unwrap_or_default()
}

#[derive(Default)]
struct Scan {
    /// What [`locate`] builds; `None` in [`check`].
    locator: Option<Locator>,
    /// Collections not closed yet, outermost first.
    open: Vec<Open>,
    /// By anchor id (yaml-rust2 numbers each `&name` it meets): the node, its weight and height.
    anchors: HashMap<usize, Anchored>,
    /// What aliases added so far (see [`MAX_ALIAS_EXPANSION`]).
    expanded: u64,
    documents: usize,
    duplicates: Vec<(At, String)>,
}

struct Open {
    /// Its index in the locator's nodes (0 in [`check`]).
    node: usize,
    anchor: usize,
    /// Bytes of its scalars plus one per node, aliases expanded.
    weight: u64,
    /// Levels of collections from it down, itself included.
    height: usize,
    /// A mapping's keys so far and where each is written ([`check`] only, for duplicates);
    /// `None` for a sequence.
    keys: Option<HashMap<String, At>>,
    /// A mapping's key whose value comes next: its text (`None` unless a scalar) and position.
    key: Option<(Option<String>, At)>,
}

#[derive(Clone, Copy)]
struct Anchored {
    node: usize,
    weight: u64,
    height: usize,
}

impl Scan {
    /// Consumes the events; stops at the first syntax error or exceeded bound.
    fn events(&mut self, source: &str) -> Result<(), (At, String)> {
        let mut parser = Parser::new_from_str(source);
        loop {
            let (event, mark) = parser.next_token().map_err(|e| {
                let at = (e.marker().line(), e.marker().col() + 1);
                // yaml-rust2 stops at 256 levels of flow collections, before any of their events.
                if e.info() == "recursion limit exceeded" {
                    (at, too_deep())
                } else {
                    (at, e.info().to_string())
                }
            })?;
            let at = (mark.line(), mark.col() + 1);
            match event {
                Event::StreamEnd => return Ok(()),
                Event::DocumentStart => {
                    self.documents += 1;
                    if self.documents > 1 {
                        return Err((
                            at,
                            "a second YAML document starts here; the configuration is one document".into(),
                        ));
                    }
                }
                Event::Scalar(text, _, anchor, _) => {
                    let node = self.node(at, Shape::Scalar);
                    let weight = 1 + text.len() as u64;
                    self.anchor(anchor, node, weight, 0);
                    self.done(node, weight, 0, Some(text), at);
                }
                Event::SequenceStart(anchor, _) => self.start(at, anchor, false)?,
                Event::MappingStart(anchor, _) => self.start(at, anchor, true)?,
                Event::SequenceEnd | Event::MappingEnd => {
                    let o = self.open.pop().expect("the parser balances starts and ends");
                    self.anchor(o.anchor, o.node, o.weight, o.height);
                    self.done(o.node, o.weight, o.height, None, at);
                }
                Event::Alias(id) => {
                    // Anchors are recorded when their node ends: one not recorded yet is open,
                    // and the alias is inside the node it names.
                    let a = *self
                        .anchors
                        .get(&id)
                        .ok_or_else(|| (at, "this alias is inside the node it names".to_string()))?;
                    if self.open.len() + a.height > MAX_DEPTH {
                        return Err((at, too_deep()));
                    }
                    self.expanded = self.expanded.saturating_add(a.weight);
                    if self.expanded > MAX_ALIAS_EXPANSION {
                        return Err((
                            at,
                            format!(
                                "aliases repeat more than {} MiB; with this one the document would be too large to read",
                                MAX_ALIAS_EXPANSION >> 20
                            ),
                        ));
                    }
                    self.done(a.node, a.weight, a.height, None, at);
                }
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
            }
        }
    }

    /// A new node's index in the locator (0 when there is none).
    fn node(&mut self, at: At, shape: Shape) -> usize {
        let Some(locator) = &mut self.locator else {
            return 0;
        };
        locator.nodes.push(Node { at, shape });
        locator.nodes.len() - 1
    }

    fn start(&mut self, at: At, anchor: usize, mapping: bool) -> Result<(), (At, String)> {
        if self.open.len() >= MAX_DEPTH {
            return Err((at, too_deep()));
        }
        let shape = if mapping {
            Shape::Mapping(Vec::new())
        } else {
            Shape::Sequence(Vec::new())
        };
        let node = self.node(at, shape);
        let keys = (mapping && self.locator.is_none()).then(HashMap::new);
        self.open.push(Open {
            node,
            anchor,
            weight: 1,
            height: 1,
            keys,
            key: None,
        });
        Ok(())
    }

    fn anchor(&mut self, anchor: usize, node: usize, weight: u64, height: usize) {
        if anchor != 0 {
            self.anchors.insert(anchor, Anchored { node, weight, height });
        }
    }

    /// A node is complete: it joins the collection it is in (as an item, a key or a value), or
    /// is the document's root. `text` is a scalar's, for when it is a key.
    fn done(&mut self, node: usize, weight: u64, height: usize, text: Option<String>, at: At) {
        let Some(parent) = self.open.last_mut() else {
            if let Some(locator) = &mut self.locator {
                locator.root = Some(node);
            }
            return;
        };
        parent.weight = parent.weight.saturating_add(weight);
        parent.height = parent.height.max(height + 1);
        let open = self.locator.as_mut().map(|l| &mut l.nodes[parent.node]);
        let entries = match open {
            None => None,
            Some(Node {
                shape: Shape::Sequence(items),
                ..
            }) => return items.push(node),
            Some(Node {
                at: map_at,
                shape: Shape::Mapping(entries),
            }) => {
                // yaml-rust2 places a block mapping at its first `:`; a person looks for its
                // first key.
                if parent.key.is_none() && at < *map_at {
                    *map_at = at;
                }
                Some(entries)
            }
            Some(Node {
                shape: Shape::Scalar, ..
            }) => unreachable!("a scalar holds no nodes"),
        };
        if entries.is_none() && parent.keys.is_none() {
            return; // an item of a sequence, in `check`
        }
        match parent.key.take() {
            None => parent.key = Some((text, at)),
            Some((Some(key), key_at)) => {
                if let Some(entries) = entries {
                    entries.push((key, node));
                } else if let Some(keys) = &mut parent.keys {
                    match keys.entry(key) {
                        Entry::Vacant(v) => {
                            v.insert(key_at);
                        }
                        Entry::Occupied(o) => {
                            let (line, column) = *o.get();
                            let message = format!(
                                "duplicate key `{}` (first at line {line}, column {column})",
                                o.key()
                            );
                            self.duplicates.push((key_at, message));
                        }
                    }
                }
            }
            // A key that is not a scalar: no path names it.
            Some((None, _)) => {}
        }
    }
}

fn too_deep() -> String {
    format!("collections are nested more than {MAX_DEPTH} levels deep")
}
