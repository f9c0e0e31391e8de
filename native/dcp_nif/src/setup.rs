//! Glue for the dcp_setup machine.
