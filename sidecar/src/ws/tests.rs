use super::*;

fn client(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
    client_frame(fin, op, payload)
}

fn parse(p: &mut Parser, data: &[u8]) -> Result<Vec<Incoming>, Violation> {
    let mut out = Vec::new();
    p.feed(data, |m| {
        out.push(m);
        Ok(())
    })?;
    Ok(out)
}

#[test]
fn accept_key_of_the_rfc_example() {
    assert_eq!(
        accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
        "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    );
    assert!(valid_key("dGhlIHNhbXBsZSBub25jZQ=="));
    assert!(!valid_key("c2hvcnQ="));
    assert!(!valid_key("not base64!"));
}

#[test]
fn text_ping_pong_close_in_one_read() {
    let mut data = client(true, OP_TEXT, br#"{"type":"ping"}"#);
    data.extend(client(true, OP_PING, b"hi"));
    data.extend(client(true, OP_PONG, b""));
    data.extend(client(true, OP_CLOSE, &[0x03, 0xe8, b'b', b'y', b'e']));
    let mut p = Parser::new(1024);
    assert_eq!(
        parse(&mut p, &data).unwrap(),
        vec![
            Incoming::Text(br#"{"type":"ping"}"#.to_vec()),
            Incoming::Ping(b"hi".to_vec()),
            Incoming::Pong,
            Incoming::Close(Some((1000, "bye".into()))),
        ]
    );
    assert_eq!(p.buffered(), 0);
}

#[test]
fn frames_split_at_every_byte_come_out_whole() {
    let payload = vec![b'x'; 300]; // a 16-bit length
    let mut data = client(true, OP_TEXT, &payload);
    data.extend(client(false, OP_TEXT, b"ab"));
    data.extend(client(true, OP_PING, b"")); // control frames may interleave
    data.extend(client(true, OP_CONTINUATION, b"cd"));
    for split in 0..data.len() {
        let mut p = Parser::new(1024);
        let mut got = parse(&mut p, &data[..split]).unwrap();
        got.extend(parse(&mut p, &data[split..]).unwrap());
        assert_eq!(
            got,
            vec![
                Incoming::Text(payload.clone()),
                Incoming::Ping(vec![]),
                Incoming::Text(b"abcd".to_vec()),
            ],
            "split at {split}"
        );
        assert_eq!(p.buffered(), 0);
    }
}

#[test]
fn protocol_violations_close_with_a_reason() {
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (
            {
                let mut f = client(true, OP_TEXT, b"x");
                f[1] &= 0x7f; // unmasked
                f
            },
            1002,
            "client frames must be masked",
        ),
        (
            {
                let mut f = client(true, OP_TEXT, b"x");
                f[0] |= 0x40;
                f
            },
            1002,
            "reserved bits set",
        ),
        (client(true, 3, b""), 1002, "unknown opcode"),
        (
            client(false, OP_PING, b""),
            1002,
            "fragmented control frame",
        ),
        (
            client(true, OP_PING, &[0; 126]),
            1002,
            "control frame over 125 bytes",
        ),
        (
            client(true, OP_CONTINUATION, b"x"),
            1002,
            "continuation without a message",
        ),
        (
            [client(false, OP_TEXT, b"a"), client(true, OP_TEXT, b"b")].concat(),
            1002,
            "new message inside a fragmented one",
        ),
        (
            client(true, OP_TEXT, &[0xff, 0xfe]),
            1007,
            "text is not UTF-8",
        ),
        (
            client(true, OP_TEXT, &[b'a'; 2000]),
            1009,
            "message too big",
        ),
        (
            [
                client(false, OP_TEXT, &[b'a'; 600]),
                client(true, OP_CONTINUATION, &[b'a'; 600]),
            ]
            .concat(),
            1009,
            "message too big",
        ),
        (
            client(true, OP_CLOSE, &[3]),
            1002,
            "close frame of one byte",
        ),
        (
            client(true, OP_CLOSE, &[0x03, 0xed]),
            1002,
            "invalid close code",
        ), // 1005
        (
            client(true, OP_CLOSE, &[0x03, 0xe8, 0xff]),
            1007,
            "close reason is not UTF-8",
        ),
    ];
    for (data, code, reason) in cases {
        let mut p = Parser::new(1024);
        assert_eq!(
            parse(&mut p, &data),
            Err(Violation { code, reason }),
            "{data:02x?}"
        );
    }
}

#[test]
fn a_huge_announced_length_is_refused_before_anything_is_buffered() {
    let mut f = vec![0x81, 0x80 | 127];
    f.extend_from_slice(&u64::MAX.to_be_bytes());
    let mut p = Parser::new(65536);
    assert_eq!(parse(&mut p, &f).unwrap_err().code, 1009);
}

#[test]
fn binary_messages_are_reported_by_length() {
    let mut p = Parser::new(1024);
    assert_eq!(
        parse(&mut p, &client(true, OP_BINARY, &[1, 2, 3])).unwrap(),
        vec![Incoming::Binary(3)]
    );
}

#[test]
fn server_frames() {
    assert_eq!(&text(b"hi")[..], &[0x81, 2, b'h', b'i']);
    let long = text(&[b'a'; 300]);
    assert_eq!(&long[..4], &[0x81, 126, 0x01, 0x2c]);
    assert_eq!(long.len(), 304);
    let built = text_with(300, |v| v.extend_from_slice(&[b'a'; 300]));
    assert_eq!(built, long);
    let big = text_with(70_000, |v| v.extend(std::iter::repeat_n(b'a', 70_000)));
    assert_eq!(&big[..2], &[0x81, 127]);
    assert_eq!(big.len(), 70_010);
    assert_eq!(
        &text_with(2, |v| v.extend_from_slice(b"hi"))[..],
        &[0x81, 2, b'h', b'i']
    );
    assert_eq!(
        &close_frame(1001, "bye")[..],
        &[0x88, 5, 0x03, 0xe9, b'b', b'y', b'e']
    );
    // A long reason is cut at a character boundary to fit 125 bytes.
    let c = close_frame(1008, &"é".repeat(100));
    assert!(c.len() <= 127 && std::str::from_utf8(&c[4..]).is_ok());
    assert_eq!(&ping(b"")[..], &[0x89, 0]);
    assert_eq!(&pong(b"x")[..], &[0x8a, 1, b'x']);
}

fn upgrade_headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (n, v) in pairs {
        h.append(*n, http::HeaderValue::from_static(v));
    }
    h
}

#[test]
fn the_handshake_takes_the_rfc_example_and_refuses_what_is_not_one() {
    let rfc = [
        ("upgrade", "websocket"),
        ("connection", "keep-alive"),
        ("connection", "Upgrade"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];
    assert_eq!(
        handshake(&upgrade_headers(&rfc)).as_deref(),
        Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    let refused = |extra: &[(&'static str, &'static str)], without: &str| {
        let mut pairs: Vec<_> = rfc.iter().copied().filter(|(n, _)| *n != without).collect();
        pairs.extend_from_slice(extra);
        handshake(&upgrade_headers(&pairs)).map_err(|r| (r.status, r.code))
    };
    assert_eq!(refused(&[], "upgrade"), Err((426, "upgrade_required")));
    assert_eq!(refused(&[], "connection"), Err((426, "upgrade_required")));
    assert_eq!(
        refused(&[], "sec-websocket-version"),
        Err((400, "bad_request"))
    );
    assert_eq!(
        refused(&[("sec-websocket-version", "8")], "sec-websocket-version"),
        Err((400, "bad_request"))
    );
    // Two versions or two keys: which one would the answer be for?
    assert_eq!(
        refused(&[("sec-websocket-version", "13")], ""),
        Err((400, "bad_request"))
    );
    assert_eq!(
        refused(&[("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")], ""),
        Err((400, "bad_request"))
    );
    assert_eq!(
        refused(&[("sec-websocket-key", "c2hvcnQ=")], "sec-websocket-key"),
        Err((400, "bad_request"))
    );
}
