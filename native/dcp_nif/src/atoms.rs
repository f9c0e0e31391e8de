//! Atoms shared by the glue modules (created once at load by rustler).

rustler::atoms! {
    ok,
    error,
    more,
}
