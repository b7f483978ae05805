//! How urgently a request runs. Interactive traffic (someone is waiting on the answer)
//! comes first; batch work (offline jobs, OpenAI's `service_tier: "flex"`) only fills the
//! room interactive work leaves in each step, so it never slows it down.

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    /// Most urgent first: the order in which the schedulers serve the classes.
    pub const ALL: [Priority; 2] = [Priority::Interactive, Priority::Batch];

    /// `"interactive"` or `"batch"`; anything else is an invalid `priority`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "interactive" => Ok(Priority::Interactive),
            "batch" => Ok(Priority::Batch),
            _ => Err(Error::invalid(
                "priority",
                format!("priority must be \"interactive\" or \"batch\", got {name:?}"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Batch => "batch",
        }
    }

    /// Position in [`Priority::ALL`], for per-class tables.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn names_round_trip_and_unknown_ones_blame_priority() {
        for p in Priority::ALL {
            assert_eq!(Priority::parse(p.as_str()).unwrap(), p);
            assert_eq!(Priority::ALL[p.index()], p);
        }
        assert_eq!(Priority::default(), Priority::Interactive);
        let e = Priority::parse("flex").unwrap_err();
        assert_eq!(
            (e.kind(), e.param()),
            (ErrorKind::InvalidRequest, Some("priority"))
        );
        assert!(e.to_string().contains("\"flex\""), "{e}");
    }
}
