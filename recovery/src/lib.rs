//! Recovery planning: quick, replay, incremental and full.
