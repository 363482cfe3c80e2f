//! Maps a path in the configuration tree (`listeners[2].bind`) back to its line and column, so
//! that errors found after deserialisation still point at the file position a person can fix.
use marked_yaml::Node;

/// One step of a path into the YAML tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(&'static str),
    Index(usize),
}

/// A parsed copy of the document that keeps positions.
pub struct Locator {
    root: Option<Node>,
}

impl Locator {
    pub fn new(source: &str) -> Locator {
        Locator {
            root: marked_yaml::parse_yaml(0, source).ok(),
        }
    }

    /// Line and column (1-based) of the node at `path`, or of the deepest ancestor that exists
    /// (a missing key is reported at the mapping that should hold it).
    pub fn position(&self, path: &[Step]) -> (usize, usize) {
        let Some(mut node) = self.root.as_ref() else {
            return (1, 1);
        };
        let mut best = marker(node).unwrap_or((1, 1));
        for step in path {
            let next = match (step, node) {
                (Step::Key(k), Node::Mapping(m)) => m.get_node(k),
                (Step::Index(i), Node::Sequence(s)) => s.get_node(*i),
                _ => None,
            };
            match next {
                Some(n) => {
                    node = n;
                    if let Some(p) = marker(n) {
                        best = p;
                    }
                }
                None => break,
            }
        }
        best
    }
}

fn marker(node: &Node) -> Option<(usize, usize)> {
    node.span().start().map(|m| (m.line(), m.column()))
}
