//! Maps a path in the configuration tree (`listeners[2].bind`) back to its line and column, so
//! that errors found after deserialisation still point at the file position a person can fix.
//!
//! The tree holds positions only (no values) and is built by [`super::scan::locate`] when the
//! first error needs it; an alias is the node it names, so a path through an alias leads to
//! where that node is written.
/// One step of a path into the YAML tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(&'static str),
    Index(usize),
}

/// Where each node of the document is written.
#[derive(Debug, Default)]
pub(crate) struct Locator {
    pub(super) nodes: Vec<Node>,
    pub(super) root: Option<usize>,
}

/// A node: its line and column (1-based), and its children (indices into `Locator::nodes`).
#[derive(Debug)]
pub(super) struct Node {
    pub(super) at: (usize, usize),
    pub(super) shape: Shape,
}

#[derive(Debug)]
pub(super) enum Shape {
    Scalar,
    Sequence(Vec<usize>),
    /// By key, in the file's order. Scalar keys only: a key that is a collection is nothing a
    /// path can name. A Vec, searched in order: a mapping validation looks into is one of lb's
    /// sections, whose keys serde already bounded (unknown keys are errors).
    Mapping(Vec<(String, usize)>),
}

impl Locator {
    /// Line and column (1-based) of the node at `path`, or of the deepest ancestor that exists
    /// (a missing key is reported at the mapping that should hold it).
    pub fn position(&self, path: &[Step]) -> (usize, usize) {
        let Some(mut node) = self.root.map(|i| &self.nodes[i]) else {
            return (1, 1);
        };
        for step in path {
            let next = match (step, &node.shape) {
                (Step::Key(k), Shape::Mapping(m)) => {
                    m.iter().find(|(key, _)| key == k).map(|(_, value)| value)
                }
                (Step::Index(i), Shape::Sequence(s)) => s.get(*i),
                _ => None,
            };
            match next {
                Some(&n) => node = &self.nodes[n],
                None => break,
            }
        }
        node.at
    }
}
