//! Inputs shared by the benches of several crates.

/// An entitlements policy of `n` rules (`n` ≥ 1) in the shape of a real
/// one: path templates with a capture compared to a claim, prefixes with
/// role conditions, regexes with tenant lists, header-matching deny rules,
/// channel rules; the last rule allows `GET /api/v1/curves/{market}/**` for
/// markets in the `entitlements.markets` claim. Every rule is looked at on
/// every decision (a deny anywhere would win), so the position of the
/// matching rule does not change the cost.
pub fn entitlements_policy(n: usize) -> String {
    let mut rules = Vec::with_capacity(n);
    for i in 0..n.saturating_sub(1) {
        rules.push(match i % 5 {
            0 => format!(
                r#"{{"id":"r{i}","effect":"allow","match":{{"methods":["GET"],"path":{{"template":"/api/v1/p{i}/{{market}}/**"}}}},"when":[{{"attr":"claims.entitlements.markets","op":"in","capture":"market"}}]}}"#
            ),
            1 => format!(
                r#"{{"id":"r{i}","effect":"allow","match":{{"methods":["GET","HEAD"],"path":{{"prefix":"/api/v1/p{i}/"}}}},"when":[{{"attr":"roles","op":"contains","value":"role{i}"}}]}}"#
            ),
            2 => format!(
                r#"{{"id":"r{i}","effect":"allow","match":{{"path":{{"regex":"/api/v1/p{i}/(latest|history)/[A-Z-]+"}}}},"when":[{{"attr":"tenant","op":"in","values":["t{i}a","t{i}b","t{i}c"]}}]}}"#
            ),
            3 => format!(
                r#"{{"id":"r{i}","effect":"deny","match":{{"path":{{"prefix":"/api/v1/p{i}/"}},"headers":{{"x-desk":{{"exact":"desk{i}"}}}}}},"when":[{{"attr":"claims.plan","op":"eq","value":"trial"}}]}}"#
            ),
            _ => format!(
                r#"{{"id":"r{i}","effect":"allow","match":{{"channel":"pricing.p{i}.{{market}}.>"}},"when":[{{"attr":"claims.entitlements.markets","op":"contains","capture":"market"}}]}}"#
            ),
        });
    }
    rules.push(
        r#"{"id":"curves-read","effect":"allow","match":{"methods":["GET","HEAD"],"path":{"template":"/api/v1/curves/{market}/**"}},"when":[{"attr":"claims.entitlements.markets","op":"in","capture":"market"}]}"#
            .to_string(),
    );
    format!(r#"{{"default":"deny","rules":[{}]}}"#, rules.join(","))
}

/// The verified payload the benches' caller carries.
pub const CLAIMS: &str = r#"{"sub":"4f1c2a9e-8d2b-4e6f-9a0c-1b2c3d4e5f60","iss":"https://idp.254carbon.test/realms/carbon","tenant":"acme","realm_access":{"roles":["viewer","trader"]},"entitlements":{"markets":["EU-ETS","UK-ETS","CAISO","PJM","ERCOT"]},"plan":"professional","azp":"web"}"#;
