//! Host profiles: Envoy's host (the default), or a strict one that takes the
//! stricter rule wherever another proxy-wasm host is stricter than Envoy, to
//! test that a filter does not lean on Envoy-only behaviour.

/// Which proxy-wasm host the emulator behaves like, chosen with
/// [`HostBuilder::profile`](crate::HostBuilder::profile).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// Envoy's host (proxy-wasm-cpp-host and Envoy's context), as the crate
    /// documentation describes it. The default.
    #[default]
    Envoy,
    /// Envoy's host except for four rules, each the one a stricter host
    /// (Kong's ngx_wasm_module, read from its sources) applies or a worst
    /// case a filter must survive. Everything else stays Envoy's.
    ///
    /// - **Ticks.** `proxy_set_tick_period_milliseconds` traps (the VM
    ///   fails, as on any trap) when a period is already set for the root
    ///   context, and when called from a stream context. ngx_wasm_module
    ///   traps with "tick_period already set" and "can only set tick_period
    ///   in root context"; Envoy re-arms the timer (a period of 0 stops it)
    ///   in both cases. A call with 0 sets no period, so a later call is
    ///   still the first, as there.
    /// - **Shared-data CAS.** `proxy_set_shared_data` writes only with the
    ///   key's current CAS, or with 0 when the key is absent; anything else
    ///   is `CasMismatch`. So CAS 0 creates but never overwrites, and an
    ///   absent key refuses a non-zero CAS (ngx_wasm_module's
    ///   `cas != (absent ? 0 : current)`). In Envoy, 0 is unconditional and
    ///   an absent key accepts any CAS.
    /// - **Request-header removal.** `proxy_remove_header_map_value` on the
    ///   request headers returns Ok (and `BadArgument` where Envoy would)
    ///   but removes nothing. This one is a worst case, not ngx_wasm_module
    ///   (which removes): hosts have lacked request-header removal, and a
    ///   filter that relies on it to discard a client's header would leak
    ///   that header there. Setting with replace stays exact.
    /// - **Integer attributes.** `request.size`, `request.total_size`,
    ///   `request.time`, `request.duration`, `response.code`,
    ///   `response.size`, `response.total_size`, `source.port`,
    ///   `destination.port` and `connection.id` are decimal ASCII (`"200"`),
    ///   as ngx_wasm_module serves nginx variables, instead of Envoy's
    ///   8-byte little-endian int64. The number and its unit stay Envoy's
    ///   (nanoseconds for `request.time` and `request.duration`;
    ///   ngx_wasm_module gives seconds with a fraction there, which this
    ///   profile does not model).
    Strict,
}

impl Profile {
    pub(crate) fn strict(self) -> bool {
        self == Profile::Strict
    }
}
