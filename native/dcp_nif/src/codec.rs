//! Glue for the mcbp codec and splitter.
