//! Verification of delivered deltas: cheap checks first, then segment challenges.
