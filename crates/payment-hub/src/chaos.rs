//! The hub's three simulated parts and their failure switches
//! (`POST /chaos/fail/{cell}`, `/chaos/recover/{cell}`).
//!
//! One [`Chaos`] per [`Hub`](crate::Hub), shared by its handlers: "process-wide"
//! means for every request of this hub, never a global (tests run many hubs).

use std::sync::atomic::{AtomicBool, Ordering};

/// One simulated part of the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// The hub's front door: with it failed, every assertion-protected endpoint
    /// except `/chaos/*` answers 503 `GATEWAY_DOWN`.
    Gateway,
    /// Payment processing: `POST /payments/process` answers 503 `PROCESSOR_DOWN`.
    Processor,
    /// The ledger: payments and `/ledger/*` answer 503 `LEDGER_DOWN`.
    Ledger,
}

impl Cell {
    /// Every cell, in the order `/health` lists them.
    pub const ALL: [Cell; 3] = [Cell::Gateway, Cell::Processor, Cell::Ledger];

    /// Parses a path segment.
    pub fn parse(text: &str) -> Option<Cell> {
        match text {
            "gateway" => Some(Cell::Gateway),
            "processor" => Some(Cell::Processor),
            "ledger" => Some(Cell::Ledger),
            _ => None,
        }
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Cell::Gateway => "gateway",
            Cell::Processor => "processor",
            Cell::Ledger => "ledger",
        }
    }
}

/// The failure switches. Relaxed atomics: each switch is independent, and a
/// request that starts just before a flip may see either state.
#[derive(Debug, Default)]
pub struct Chaos {
    gateway: AtomicBool,
    processor: AtomicBool,
    ledger: AtomicBool,
}

impl Chaos {
    fn switch(&self, cell: Cell) -> &AtomicBool {
        match cell {
            Cell::Gateway => &self.gateway,
            Cell::Processor => &self.processor,
            Cell::Ledger => &self.ledger,
        }
    }

    /// Whether `cell` is failed.
    pub fn is_failed(&self, cell: Cell) -> bool {
        self.switch(cell).load(Ordering::Relaxed)
    }

    /// Fails (`true`) or recovers (`false`) `cell`.
    pub fn set_failed(&self, cell: Cell, failed: bool) {
        self.switch(cell).store(failed, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_are_independent_and_names_round_trip() {
        let chaos = Chaos::default();
        chaos.set_failed(Cell::Ledger, true);
        assert!(chaos.is_failed(Cell::Ledger));
        assert!(!chaos.is_failed(Cell::Processor));
        assert!(!chaos.is_failed(Cell::Gateway));
        chaos.set_failed(Cell::Ledger, false);
        assert!(!chaos.is_failed(Cell::Ledger));
        for cell in Cell::ALL {
            assert_eq!(Cell::parse(cell.as_str()), Some(cell));
        }
        assert_eq!(Cell::parse("database"), None);
    }
}
