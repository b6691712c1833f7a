//! The Kubernetes API test server, spoken to over plain HTTP/1.1 the way kube-rs does.
//!
//! No root needed: every server listens on 127.0.0.1 in the current namespace. A tiny blocking
//! HTTP client below (with chunked decoding) plays the client, so what is tested is the wire.
use std::{
    collections::{BTreeMap, VecDeque},
    io::{BufRead, BufReader, ErrorKind, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::{Node, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_json::Value;
use testbed::apiserver::{ApiError, ApiServer};

const WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

fn server() -> ApiServer {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    ApiServer::start(listener).expect("start the API server")
}

fn meta(namespace: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        }),
        ..Default::default()
    }
}

fn service(namespace: &str, name: &str, labels: &[(&str, &str)]) -> Service {
    Service {
        metadata: meta(Some(namespace), name, labels),
        spec: Some(ServiceSpec {
            ports: Some(vec![ServicePort {
                port: 80,
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn slice(namespace: &str, name: &str, address: &str) -> EndpointSlice {
    EndpointSlice {
        metadata: meta(
            Some(namespace),
            name,
            &[("kubernetes.io/service-name", "web")],
        ),
        address_type: "IPv4".into(),
        endpoints: vec![Endpoint {
            addresses: vec![address.into()],
            ..Default::default()
        }],
        ports: Some(vec![EndpointPort {
            port: Some(8080),
            ..Default::default()
        }]),
    }
}

fn node(name: &str) -> Node {
    Node {
        metadata: meta(None, name, &[]),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// A tiny blocking HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

struct Reply {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body, got {e}: {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts that this is a Status failure with the given code and reason.
    fn expect_status(&self, code: u16, reason: &str) -> Value {
        let body = self.json();
        assert_eq!(
            self.headers.get("content-type").map(String::as_str),
            Some("application/json"),
            "a Status is JSON: {body}"
        );
        assert_eq!(
            (
                self.status,
                body["kind"].as_str(),
                body["apiVersion"].as_str()
            ),
            (code, Some("Status"), Some("v1")),
            "expected an HTTP {code} Status object, got HTTP {}: {body}",
            self.status
        );
        assert_eq!(body["status"], "Failure", "Status object: {body}");
        assert_eq!(body["code"], code, "Status object: {body}");
        assert_eq!(body["reason"], reason, "Status object: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "a Status needs a message: {body}"
        );
        body
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to the API server");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
}

fn send(
    stream: &mut TcpStream,
    method: &str,
    target: &str,
    token: Option<&str>,
    close: bool,
) -> std::io::Result<()> {
    let mut head =
        format!("{method} {target} HTTP/1.1\r\nHost: apiserver\r\nAccept: application/json\r\n");
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())
}

fn read_head(reader: &mut impl BufRead) -> std::io::Result<(u16, BTreeMap<String, String>)> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = BTreeMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            return Ok((status, headers));
        }
        let (name, value) = line.split_once(':').expect("a header line");
        headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
    }
}

/// Reads one chunk: `Some(data)`, `None` at the last chunk. Errors on EOF mid-stream.
fn read_chunk(reader: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    let size = usize::from_str_radix(line.trim(), 16)
        .unwrap_or_else(|_| panic!("bad chunk size line {line:?}"));
    let mut data = vec![0; size];
    reader.read_exact(&mut data)?;
    let mut crlf = [0; 2];
    reader.read_exact(&mut crlf)?;
    Ok((size > 0).then_some(data))
}

fn read_body(
    reader: &mut impl BufRead,
    headers: &BTreeMap<String, String>,
) -> std::io::Result<Vec<u8>> {
    if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        let mut body = Vec::new();
        while let Some(chunk) = read_chunk(reader)? {
            body.extend(chunk);
        }
        Ok(body)
    } else {
        let length = headers
            .get("content-length")
            .map_or(0, |l| l.parse().expect("a content length"));
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        Ok(body)
    }
}

fn request(api: &ApiServer, method: &str, target: &str, token: Option<&str>) -> Reply {
    let mut stream = connect(api.addr());
    send(&mut stream, method, target, token, true).expect("send the request");
    let mut reader = BufReader::new(stream);
    let (status, headers) = read_head(&mut reader).expect("read the response head");
    let body = read_body(&mut reader, &headers).expect("read the response body");
    Reply {
        status,
        headers,
        body,
    }
}

/// GET with the server's token.
fn get(api: &ApiServer, target: &str) -> Reply {
    request(api, "GET", target, Some(api.token()))
}

fn get_json(api: &ApiServer, target: &str) -> Value {
    let reply = get(api, target);
    assert_eq!(
        reply.status,
        200,
        "GET {target}: {}",
        String::from_utf8_lossy(&reply.body)
    );
    reply.json()
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("a list with items: {list}"))
        .iter()
        .map(|item| {
            let meta = &item["metadata"];
            match meta["namespace"].as_str() {
                Some(ns) => format!("{ns}/{}", meta["name"].as_str().unwrap()),
                None => meta["name"].as_str().unwrap().to_owned(),
            }
        })
        .collect()
}

fn rv_of(value: &Value) -> u64 {
    value["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|rv| rv.parse().ok())
        .unwrap_or_else(|| panic!("a numeric metadata.resourceVersion in {value}"))
}

/// How a watch stream ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The last chunk arrived: the server ended the response.
    Clean,
    /// The connection closed (or failed) mid-stream.
    Abrupt,
}

/// An open watch: a chunked response of JSON lines.
struct Watch {
    reader: BufReader<TcpStream>,
    partial: Vec<u8>,
    events: VecDeque<Value>,
    ended: Option<End>,
}

impl Watch {
    fn open(api: &ApiServer, target: &str) -> Watch {
        let mut stream = connect(api.addr());
        send(&mut stream, "GET", target, Some(api.token()), false).expect("send the watch");
        let mut reader = BufReader::new(stream);
        let (status, headers) = read_head(&mut reader).expect("read the watch response head");
        assert_eq!(status, 200, "watch {target}: expected 200");
        assert_eq!(
            headers.get("content-type").map(String::as_str),
            Some("application/json")
        );
        assert_eq!(
            headers.get("transfer-encoding").map(String::as_str),
            Some("chunked"),
            "a watch is a chunked stream"
        );
        Watch {
            reader,
            partial: Vec::new(),
            events: VecDeque::new(),
            ended: None,
        }
    }

    /// The next event, or how the stream ended; `None` if nothing came within `within`.
    fn poll(&mut self, within: Duration) -> Option<Result<Value, End>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(event) = self.events.pop_front() {
                return Some(Ok(event));
            }
            if let Some(end) = self.ended.take() {
                return Some(Err(end));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.reader.get_ref().set_read_timeout(Some(left)).unwrap();
            match read_chunk(&mut self.reader) {
                Ok(Some(data)) => {
                    self.partial.extend(data);
                    while let Some(newline) = self.partial.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = self.partial.drain(..=newline).collect();
                        let event = serde_json::from_slice(&line).unwrap_or_else(|e| {
                            panic!("a watch line is one JSON object ({e}): {line:?}")
                        });
                        self.events.push_back(event);
                    }
                }
                Ok(None) => self.ended = Some(End::Clean),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return None;
                }
                Err(_) => self.ended = Some(End::Abrupt),
            }
        }
    }

    fn next(&mut self) -> Value {
        match self.poll(WAIT) {
            Some(Ok(event)) => event,
            Some(Err(end)) => panic!("expected a watch event, the stream ended ({end:?})"),
            None => panic!("expected a watch event within {WAIT:?}, got none"),
        }
    }

    /// The next event that is not a BOOKMARK.
    fn next_change(&mut self) -> Value {
        loop {
            let event = self.next();
            if event["type"] != "BOOKMARK" {
                return event;
            }
        }
    }

    fn end(&mut self) -> End {
        loop {
            match self.poll(WAIT) {
                Some(Ok(event)) if event["type"] == "BOOKMARK" => {}
                Some(Ok(event)) => panic!("expected the stream to end, got {event}"),
                Some(Err(end)) => return end,
                None => panic!("expected the stream to end within {WAIT:?}"),
            }
        }
    }
}

/// Asserts an event's type and the object's namespace/name, and returns the object.
fn expect_event(event: &Value, kind: &str, name: &str) -> Value {
    let object = &event["object"];
    let meta = &object["metadata"];
    let actual = match meta["namespace"].as_str() {
        Some(ns) => format!("{ns}/{}", meta["name"].as_str().unwrap_or_default()),
        None => meta["name"].as_str().unwrap_or_default().to_owned(),
    };
    assert_eq!(
        (event["type"].as_str(), actual.as_str()),
        (Some(kind), name),
        "unexpected watch event {event}"
    );
    object.clone()
}

fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Lists and gets
// ---------------------------------------------------------------------------------------------

#[test]
fn lists_are_typed_lists_at_the_current_resource_version() {
    let api = server();
    api.create(&service("default", "web", &[])).unwrap();
    api.create(&slice("default", "web-abc", "10.0.0.1"))
        .unwrap();
    api.create(&node("node-a")).unwrap();

    for (path, kind, api_version) in [
        ("/api/v1/services", "ServiceList", "v1"),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            "EndpointSliceList",
            "discovery.k8s.io/v1",
        ),
        ("/api/v1/nodes", "NodeList", "v1"),
    ] {
        let list = get_json(&api, path);
        assert_eq!(list["kind"], kind, "{path}: {list}");
        assert_eq!(list["apiVersion"], api_version, "{path}: {list}");
        assert_eq!(
            rv_of(&list),
            api.resource_version(),
            "{path}: a list is at the current version"
        );
        assert!(list["metadata"].get("continue").is_none(), "{path}: {list}");
        let items = list["items"].as_array().unwrap();
        assert_eq!(items.len(), 1, "{path}: {list}");
        // The real server leaves kind and apiVersion off list items.
        assert!(items[0].get("kind").is_none(), "{path}: {list}");
        assert!(items[0].get("apiVersion").is_none(), "{path}: {list}");
    }
}

#[test]
fn list_items_are_in_key_order_and_namespaced_paths_select_one_namespace() {
    let api = server();
    for (ns, name) in [("b", "z"), ("a", "y"), ("b", "a"), ("a", "x")] {
        api.create(&service(ns, name, &[])).unwrap();
    }
    let all = get_json(&api, "/api/v1/services");
    assert_eq!(names(&all), ["a/x", "a/y", "b/a", "b/z"]);
    let in_b = get_json(&api, "/api/v1/namespaces/b/services");
    assert_eq!(names(&in_b), ["b/a", "b/z"]);
    let empty = get_json(&api, "/api/v1/namespaces/c/services");
    assert_eq!(empty["items"], serde_json::json!([]));
}

#[test]
fn get_returns_the_object_or_a_not_found_status() {
    let api = server();
    let rv = api.create(&service("default", "web", &[])).unwrap();
    api.create(&node("node-a")).unwrap();

    let svc = get_json(&api, "/api/v1/namespaces/default/services/web");
    assert_eq!(
        (svc["kind"].as_str(), svc["apiVersion"].as_str()),
        (Some("Service"), Some("v1"))
    );
    assert_eq!(svc["metadata"]["resourceVersion"], rv.as_str());
    assert_eq!(get_json(&api, "/api/v1/nodes/node-a")["kind"], "Node");

    let missing =
        get(&api, "/api/v1/namespaces/default/services/nope").expect_status(404, "NotFound");
    assert_eq!(missing["details"]["name"], "nope");
    assert_eq!(missing["details"]["kind"], "services");
    get(
        &api,
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/nope",
    )
    .expect_status(404, "NotFound");
}

#[test]
fn the_server_sets_metadata_and_defaults_like_the_real_one() {
    let api = server();
    let rv = api.create(&service("default", "web", &[])).unwrap();
    let svc = get_json(&api, "/api/v1/namespaces/default/services/web");
    let meta = &svc["metadata"];
    assert_eq!(meta["resourceVersion"], rv.as_str());
    assert_eq!(meta["generation"], 1);
    assert_eq!(
        meta["uid"].as_str().map(str::len),
        Some(36),
        "a UUID: {meta}"
    );
    assert!(
        meta["creationTimestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 20),
        "an RFC 3339 timestamp to the second: {meta}"
    );
    assert!(meta["managedFields"].is_array(), "{meta}");
    let spec = &svc["spec"];
    assert_eq!(spec["type"], "ClusterIP");
    assert_eq!(spec["sessionAffinity"], "None");
    assert_eq!(spec["ports"][0]["protocol"], "TCP");
    assert_eq!(spec["ports"][0]["targetPort"], 80);
    let ip = spec["clusterIP"].as_str().expect("an allocated clusterIP");
    assert!(
        ip.starts_with("10.96."),
        "allocated from 10.96.0.0/12: {ip}"
    );
    assert_eq!(spec["clusterIPs"], serde_json::json!([ip]));
    assert_eq!(spec["ipFamilies"], serde_json::json!(["IPv4"]));

    let mut nodeport = service("default", "np", &[]);
    nodeport.spec.as_mut().unwrap().type_ = Some("NodePort".into());
    api.create(&nodeport).unwrap();
    let np = get_json(&api, "/api/v1/namespaces/default/services/np");
    let port = np["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .expect("an allocated nodePort");
    assert!((30000..=32767).contains(&port), "{port}");
    assert_ne!(
        np["spec"]["clusterIP"].as_str(),
        Some(ip),
        "a different clusterIP"
    );

    api.create(&slice("default", "web-abc", "10.0.0.1"))
        .unwrap();
    let eps = get_json(
        &api,
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/web-abc",
    );
    assert_eq!(eps["ports"][0]["protocol"], "TCP");
}

#[test]
fn updates_keep_identity_bump_generation_on_spec_changes_and_skip_no_ops() {
    let api = server();
    let created = api.create(&service("default", "web", &[])).unwrap();
    let before = get_json(&api, "/api/v1/namespaces/default/services/web");

    let same = api.update(&service("default", "web", &[])).unwrap();
    assert_eq!(same, created, "an unchanged update writes nothing");

    let relabelled = api
        .update(&service("default", "web", &[("app", "web")]))
        .unwrap();
    let after = get_json(&api, "/api/v1/namespaces/default/services/web");
    assert!(relabelled.parse::<u64>().unwrap() > created.parse::<u64>().unwrap());
    assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"]);
    assert_eq!(
        after["metadata"]["creationTimestamp"],
        before["metadata"]["creationTimestamp"]
    );
    assert_eq!(after["metadata"]["generation"], 1, "labels are not spec");
    assert_eq!(
        after["spec"]["clusterIP"], before["spec"]["clusterIP"],
        "the clusterIP is kept when the update leaves it out"
    );

    let mut changed = service("default", "web", &[("app", "web")]);
    changed.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 443;
    api.apply(&changed).unwrap();
    let after = get_json(&api, "/api/v1/namespaces/default/services/web");
    assert_eq!(after["metadata"]["generation"], 2);
}

#[test]
fn writes_report_conflicts_and_missing_objects() {
    let api = server();
    api.create(&service("default", "web", &[])).unwrap();
    assert!(
        matches!(
            api.create(&service("default", "web", &[])),
            Err(ApiError::AlreadyExists { .. })
        ),
        "a second create of the same Service must fail"
    );
    assert!(matches!(
        api.update(&service("default", "other", &[])),
        Err(ApiError::NotFound { .. })
    ));
    assert!(matches!(
        api.delete::<Service>(Some("default"), "other"),
        Err(ApiError::NotFound { .. })
    ));
    assert!(matches!(
        api.delete::<Service>(None, "web"),
        Err(ApiError::MissingNamespace { .. })
    ));
    let mut unnamed = service("default", "x", &[]);
    unnamed.metadata.name = None;
    assert!(matches!(
        api.create(&unnamed),
        Err(ApiError::MissingName { .. })
    ));
    let mut taken = service("default", "taken", &[]);
    taken.spec.as_mut().unwrap().cluster_ip =
        get_json(&api, "/api/v1/namespaces/default/services/web")["spec"]["clusterIP"]
            .as_str()
            .map(str::to_owned);
    assert!(
        matches!(api.create(&taken), Err(ApiError::Invalid { .. })),
        "a clusterIP already in use must be refused"
    );
    assert!(matches!(
        api.create(&k8s_openapi::api::core::v1::Pod::default()),
        Err(ApiError::UnsupportedKind { .. })
    ));
    api.delete::<Service>(Some("default"), "web").unwrap();
    assert_eq!(
        get_json(&api, "/api/v1/services")["items"],
        serde_json::json!([])
    );
}

#[test]
fn paging_serves_every_page_from_the_first_pages_snapshot() {
    let api = server();
    for name in ["a", "b", "c", "d", "e"] {
        api.create(&service("default", name, &[])).unwrap();
    }
    let first = get_json(&api, "/api/v1/services?limit=2");
    let snapshot = rv_of(&first);
    assert_eq!(names(&first), ["default/a", "default/b"]);
    assert_eq!(first["metadata"]["remainingItemCount"], 3);
    let token = first["metadata"]["continue"]
        .as_str()
        .expect("a continue token")
        .to_owned();

    // Changes between pages must not show: the later pages are at the first page's version.
    api.delete::<Service>(Some("default"), "c").unwrap();
    api.create(&service("default", "f", &[])).unwrap();

    let second = get_json(&api, &format!("/api/v1/services?limit=2&continue={token}"));
    assert_eq!(names(&second), ["default/c", "default/d"]);
    assert_eq!(rv_of(&second), snapshot);
    let token = second["metadata"]["continue"]
        .as_str()
        .expect("a continue token")
        .to_owned();
    let last = get_json(&api, &format!("/api/v1/services?limit=2&continue={token}"));
    assert_eq!(names(&last), ["default/e"]);
    assert_eq!(rv_of(&last), snapshot);
    assert!(
        last["metadata"].get("continue").is_none(),
        "the last page has no token: {last}"
    );

    let fresh = get_json(&api, "/api/v1/services");
    assert_eq!(
        names(&fresh),
        [
            "default/a",
            "default/b",
            "default/d",
            "default/e",
            "default/f"
        ]
    );
}

#[test]
fn a_continue_token_from_before_expire_is_410_expired() {
    let api = server();
    for name in ["a", "b", "c"] {
        api.create(&service("default", name, &[])).unwrap();
    }
    let first = get_json(&api, "/api/v1/services?limit=1");
    let token = first["metadata"]["continue"].as_str().unwrap().to_owned();
    api.expire();
    get(&api, &format!("/api/v1/services?limit=1&continue={token}")).expect_status(410, "Expired");
}

#[test]
fn list_at_a_version_honours_exact_and_not_older_than() {
    let api = server();
    let old = api.create(&service("default", "a", &[])).unwrap();
    api.create(&service("default", "b", &[])).unwrap();

    let exact = get_json(
        &api,
        &format!("/api/v1/services?resourceVersion={old}&resourceVersionMatch=Exact"),
    );
    assert_eq!(names(&exact), ["default/a"], "the state at {old}");
    assert_eq!(exact["metadata"]["resourceVersion"], old.as_str());
    let newer = get_json(
        &api,
        &format!("/api/v1/services?resourceVersion={old}&resourceVersionMatch=NotOlderThan"),
    );
    assert_eq!(names(&newer), ["default/a", "default/b"]);
    let any = get_json(&api, "/api/v1/services?resourceVersion=0&limit=1");
    assert_eq!(
        names(&any),
        ["default/a", "default/b"],
        "version 0 is served whole"
    );

    api.expire();
    get(
        &api,
        &format!("/api/v1/services?resourceVersion={old}&resourceVersionMatch=Exact"),
    )
    .expect_status(410, "Expired");
    let future = api.resource_version() + 10;
    get(&api, &format!("/api/v1/services?resourceVersion={future}")).expect_status(504, "Timeout");
}

#[test]
fn label_and_field_selectors_filter_lists() {
    let api = server();
    api.create(&service(
        "prod",
        "web",
        &[("app", "web"), ("tier", "front")],
    ))
    .unwrap();
    api.create(&service("prod", "db", &[("app", "db")]))
        .unwrap();
    api.create(&service("dev", "web", &[("app", "web")]))
        .unwrap();
    api.create(&service("dev", "bare", &[])).unwrap();

    for (selector, expected) in [
        ("labelSelector=app%3Dweb", vec!["dev/web", "prod/web"]),
        ("labelSelector=app%3D%3Dweb", vec!["dev/web", "prod/web"]),
        ("labelSelector=app%21%3Dweb", vec!["dev/bare", "prod/db"]),
        ("labelSelector=tier", vec!["prod/web"]),
        ("labelSelector=%21app", vec!["dev/bare"]),
        ("labelSelector=app%3Dweb%2C%21tier", vec!["dev/web"]),
        (
            "labelSelector=app+in+%28db%2Cweb%29",
            vec!["dev/web", "prod/db", "prod/web"],
        ),
        (
            "labelSelector=app+notin+%28web%29",
            vec!["dev/bare", "prod/db"],
        ),
        (
            "fieldSelector=metadata.name%3Dweb",
            vec!["dev/web", "prod/web"],
        ),
        (
            "fieldSelector=metadata.namespace%3Ddev",
            vec!["dev/bare", "dev/web"],
        ),
        (
            "fieldSelector=metadata.namespace%21%3Ddev&labelSelector=app",
            vec!["prod/db", "prod/web"],
        ),
    ] {
        let list = get_json(&api, &format!("/api/v1/services?{selector}"));
        assert_eq!(names(&list), expected, "selector {selector}");
    }
    get(
        &api,
        "/api/v1/services?fieldSelector=spec.clusterIP%3D1.2.3.4",
    )
    .expect_status(400, "BadRequest");
    get(&api, "/api/v1/services?labelSelector=a+in+b").expect_status(400, "BadRequest");
}

#[test]
fn paging_with_a_selector_counts_only_matching_items() {
    let api = server();
    for (name, app) in [("a", "x"), ("b", "y"), ("c", "x"), ("d", "x")] {
        api.create(&service("default", name, &[("app", app)]))
            .unwrap();
    }
    let first = get_json(&api, "/api/v1/services?labelSelector=app%3Dx&limit=2");
    assert_eq!(names(&first), ["default/a", "default/c"]);
    assert!(
        first["metadata"].get("remainingItemCount").is_none(),
        "no count with a selector"
    );
    let token = first["metadata"]["continue"].as_str().unwrap();
    let rest = get_json(
        &api,
        &format!("/api/v1/services?labelSelector=app%3Dx&limit=2&continue={token}"),
    );
    assert_eq!(names(&rest), ["default/d"]);
}

#[test]
fn bad_list_and_watch_options_get_the_real_servers_errors() {
    let api = server();
    get(&api, "/api/v1/services?resourceVersionMatch=Exact").expect_status(422, "Invalid");
    get(
        &api,
        "/api/v1/services?resourceVersion=0&resourceVersionMatch=Exact",
    )
    .expect_status(422, "Invalid");
    get(
        &api,
        "/api/v1/services?resourceVersion=1&resourceVersionMatch=Sometimes",
    )
    .expect_status(422, "Invalid");
    get(&api, "/api/v1/services?resourceVersion=abc").expect_status(400, "BadRequest");
    get(&api, "/api/v1/services?continue=zzz").expect_status(400, "BadRequest");
    get(
        &api,
        "/api/v1/services?watch=true&sendInitialEvents=true&allowWatchBookmarks=true",
    )
    .expect_status(422, "Invalid");
    get(
        &api,
        "/api/v1/services?watch=true&resourceVersionMatch=NotOlderThan&resourceVersion=1",
    )
    .expect_status(422, "Invalid");
}

// ---------------------------------------------------------------------------------------------
// Watches
// ---------------------------------------------------------------------------------------------

#[test]
fn watch_replays_history_after_its_version_then_streams_live_changes() {
    let api = server();
    let start = api.create(&service("default", "before", &[])).unwrap();
    api.create(&service("default", "a", &[])).unwrap();
    api.update(&service("default", "a", &[("v", "2")])).unwrap();
    api.create(&node("node-a")).unwrap(); // another kind: not in this watch

    let mut watch = Watch::open(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={start}"),
    );
    let added = expect_event(&watch.next(), "ADDED", "default/a");
    assert_eq!(added["kind"], "Service", "watch objects carry their kind");
    let modified = expect_event(&watch.next(), "MODIFIED", "default/a");
    assert!(rv_of(&modified) > rv_of(&added));

    let rv = api.create(&service("default", "b", &[])).unwrap();
    let live = expect_event(&watch.next(), "ADDED", "default/b");
    assert_eq!(live["metadata"]["resourceVersion"], rv.as_str());
    api.update(&service("default", "b", &[("v", "2")])).unwrap();
    expect_event(&watch.next(), "MODIFIED", "default/b");
    let deleted_at = api.delete::<Service>(Some("default"), "b").unwrap();
    let deleted = expect_event(&watch.next(), "DELETED", "default/b");
    assert_eq!(
        deleted["metadata"]["resourceVersion"],
        deleted_at.as_str(),
        "a DELETED object carries the deletion's version"
    );
    assert!(
        watch.poll(Duration::from_millis(200)).is_none(),
        "nothing else happened"
    );
}

#[test]
fn namespaced_watches_see_only_their_namespace() {
    let api = server();
    let start = api.resource_version();
    let mut watch = Watch::open(
        &api,
        &format!("/api/v1/namespaces/prod/services?watch=1&resourceVersion={start}"),
    );
    api.create(&service("dev", "web", &[])).unwrap();
    api.create(&service("prod", "web", &[])).unwrap();
    expect_event(&watch.next(), "ADDED", "prod/web");
}

#[test]
fn watch_from_version_zero_starts_with_synthetic_added_events() {
    let api = server();
    api.create(&slice("default", "web-1", "10.0.0.1")).unwrap();
    api.create(&slice("default", "web-2", "10.0.0.2")).unwrap();
    let mut watch = Watch::open(
        &api,
        "/apis/discovery.k8s.io/v1/endpointslices?watch=true&resourceVersion=0",
    );
    let first = expect_event(&watch.next(), "ADDED", "default/web-1");
    assert_eq!(first["apiVersion"], "discovery.k8s.io/v1");
    expect_event(&watch.next(), "ADDED", "default/web-2");
    api.delete::<EndpointSlice>(Some("default"), "web-1")
        .unwrap();
    expect_event(&watch.next(), "DELETED", "default/web-1");
}

#[test]
fn watch_with_a_selector_sees_objects_enter_and_leave_as_added_and_deleted() {
    let api = server();
    let start = api.create(&service("default", "web", &[])).unwrap();
    let mut watch = Watch::open(
        &api,
        &format!("/api/v1/services?watch=true&labelSelector=app%3Dweb&resourceVersion={start}"),
    );
    api.update(&service("default", "web", &[("app", "web")]))
        .unwrap();
    expect_event(&watch.next(), "ADDED", "default/web");
    api.update(&service("default", "web", &[("app", "web"), ("x", "y")]))
        .unwrap();
    expect_event(&watch.next(), "MODIFIED", "default/web");
    let left_at = api
        .update(&service("default", "web", &[("app", "db")]))
        .unwrap();
    let gone = expect_event(&watch.next(), "DELETED", "default/web");
    assert_eq!(
        gone["metadata"]["labels"]["app"], "web",
        "the last matching state"
    );
    assert_eq!(gone["metadata"]["resourceVersion"], left_at.as_str());
}

#[test]
fn bookmarks_arrive_only_when_allowed() {
    let api = server();
    api.set_bookmark_interval(Duration::from_millis(100));
    api.create(&node("node-a")).unwrap();
    let rv = api.resource_version();
    let mut watch = Watch::open(
        &api,
        &format!("/api/v1/nodes?watch=true&allowWatchBookmarks=true&resourceVersion={rv}"),
    );
    let bookmark = watch.next();
    assert_eq!(bookmark["type"], "BOOKMARK", "{bookmark}");
    let object = &bookmark["object"];
    assert_eq!(
        (object["kind"].as_str(), object["apiVersion"].as_str()),
        (Some("Node"), Some("v1"))
    );
    assert_eq!(rv_of(object), rv);
    assert!(
        object["metadata"].get("name").is_none(),
        "a bookmark is empty: {object}"
    );
    // A change elsewhere moves the version the next bookmark reports.
    let later = api.create(&service("default", "web", &[])).unwrap();
    eventually("a bookmark reports the newer version", || {
        rv_of(&watch.next()["object"]) == later.parse::<u64>().unwrap()
    });

    let mut plain = Watch::open(
        &api,
        &format!("/api/v1/nodes?watch=true&timeoutSeconds=1&resourceVersion={rv}"),
    );
    match plain.poll(Duration::from_secs(3)) {
        Some(Err(End::Clean)) => {}
        other => panic!("expected no bookmark and a clean end after 1 s, got {other:?}"),
    }
}

#[test]
fn expire_ends_open_watches_with_410_and_old_versions_are_gone() {
    let api = server();
    let old = api.create(&service("default", "web", &[])).unwrap();
    let mut watch = Watch::open(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={old}"),
    );
    eventually("the watch is open", || api.open_watches() == 1);

    api.expire();
    let error = watch.next();
    assert_eq!(error["type"], "ERROR", "{error}");
    let status = &error["object"];
    assert_eq!(
        (
            status["kind"].as_str(),
            status["apiVersion"].as_str(),
            status["status"].as_str(),
            status["reason"].as_str(),
            status["code"].as_u64()
        ),
        (
            Some("Status"),
            Some("v1"),
            Some("Failure"),
            Some("Expired"),
            Some(410)
        ),
        "{status}"
    );
    assert_eq!(watch.end(), End::Clean);

    // A watch from the old version: 200, then the same ERROR, then the end.
    let mut again = Watch::open(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={old}"),
    );
    let error = again.next();
    assert_eq!(
        (error["type"].as_str(), error["object"]["code"].as_u64()),
        (Some("ERROR"), Some(410))
    );
    assert_eq!(again.end(), End::Clean);

    // A fresh list gives a version that can be watched from.
    let list = get_json(&api, "/api/v1/services");
    let mut fresh = Watch::open(
        &api,
        &format!(
            "/api/v1/services?watch=true&resourceVersion={}",
            rv_of(&list)
        ),
    );
    api.create(&service("default", "new", &[])).unwrap();
    expect_event(&fresh.next(), "ADDED", "default/new");
}

#[test]
fn drop_watches_ends_streams_abruptly() {
    let api = server();
    let rv = api.resource_version();
    let mut services = Watch::open(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
    );
    let mut nodes = Watch::open(
        &api,
        &format!("/api/v1/nodes?watch=true&allowWatchBookmarks=true&resourceVersion={rv}"),
    );
    eventually("both watches are open", || api.open_watches() == 2);

    api.drop_watches();
    assert_eq!(
        services.end(),
        End::Abrupt,
        "no final chunk: the connection was cut"
    );
    assert_eq!(nodes.end(), End::Abrupt);
    eventually("no watch is open", || api.open_watches() == 0);

    // Resuming from the last version works, and sees what happened meanwhile.
    api.create(&service("default", "web", &[])).unwrap();
    let mut resumed = Watch::open(
        &api,
        &format!("/api/v1/services?watch=true&resourceVersion={rv}"),
    );
    expect_event(&resumed.next(), "ADDED", "default/web");
}

#[test]
fn watch_ends_cleanly_after_timeout_seconds() {
    let api = server();
    let rv = api.resource_version();
    let opened = Instant::now();
    let mut watch = Watch::open(
        &api,
        &format!("/api/v1/services?watch=true&timeoutSeconds=1&resourceVersion={rv}"),
    );
    assert_eq!(watch.end(), End::Clean);
    let lasted = opened.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&lasted),
        "expected the watch to last about 1 s, it lasted {lasted:?}"
    );
}

#[test]
fn streaming_list_sends_the_state_then_the_initial_events_end_bookmark() {
    let api = server();
    api.create(&service("default", "a", &[])).unwrap();
    api.create(&service("default", "b", &[])).unwrap();
    let now = api.resource_version();
    // Exactly what kube-runtime sends for `watcher::Config::default().streaming_lists()`.
    let mut watch = Watch::open(
        &api,
        "/api/v1/services?watch=true&timeoutSeconds=290&allowWatchBookmarks=true\
         &sendInitialEvents=true&resourceVersionMatch=NotOlderThan&resourceVersion=0",
    );
    expect_event(&watch.next(), "ADDED", "default/a");
    expect_event(&watch.next(), "ADDED", "default/b");
    let end = watch.next();
    assert_eq!(end["type"], "BOOKMARK", "{end}");
    assert_eq!(
        end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"],
        "true"
    );
    assert_eq!(rv_of(&end["object"]), now);
    api.create(&service("default", "c", &[])).unwrap();
    expect_event(&watch.next_change(), "ADDED", "default/c");
}

#[test]
fn kube_runtimes_list_then_watch_sequence_is_served() {
    let api = server();
    api.set_bookmark_interval(Duration::from_millis(100));
    api.create(&service("default", "web", &[])).unwrap();
    // kube-runtime 5's default watcher: a list with limit=500 and no resourceVersion...
    let list = get_json(&api, "/api/v1/services?&limit=500");
    assert_eq!(names(&list), ["default/web"]);
    let rv = rv_of(&list);
    // ...then a watch from the list's version, with bookmarks and a 290 s timeout.
    let target = format!(
        "/api/v1/services?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion={rv}"
    );
    let mut watch = Watch::open(&api, &target);
    api.create(&service("default", "api", &[])).unwrap();
    expect_event(&watch.next_change(), "ADDED", "default/api");
    assert_eq!(watch.next()["type"], "BOOKMARK");

    let log = api.requests();
    let watch_log = log
        .iter()
        .find(|r| r.is_watch())
        .expect("the watch is logged");
    assert_eq!(
        (
            watch_log.method.as_str(),
            watch_log.path.as_str(),
            watch_log.status
        ),
        ("GET", "/api/v1/services", 200)
    );
    assert_eq!(watch_log.param("resourceVersion"), Some(rv.to_string()));
    assert_eq!(
        watch_log.param("allowWatchBookmarks").as_deref(),
        Some("true")
    );
    assert_eq!(
        log[0].param("limit").as_deref(),
        Some("500"),
        "the list came first: {log:?}"
    );
}

#[test]
fn a_slow_watcher_is_cut_off_without_holding_up_the_others() {
    let api = server();
    let rv = api.resource_version();
    let target = format!("/api/v1/services?watch=true&resourceVersion={rv}");
    // Never read until the end: its socket, its buffer, then its backlog fill up.
    let mut slow = Watch::open(&api, &target);
    let mut fast = Watch::open(&api, &target);

    let padding = "x".repeat(8 * 1024);
    let total = 5000;
    let mut last = String::new();
    for i in 0..total {
        let svc = service("default", "busy", &[("n", &i.to_string())]);
        let mut svc = svc;
        svc.metadata.annotations = Some([("padding".to_owned(), padding.clone())].into());
        last = api.apply(&svc).unwrap();
        if i % 200 == 199 {
            // Let the fast watcher catch up, so only the slow one falls behind.
            while fast.next()["object"]["metadata"]["resourceVersion"] != last.as_str() {}
        }
    }
    let mut seen = 0;
    let end = loop {
        match slow.poll(WAIT) {
            Some(Ok(_)) => seen += 1,
            Some(Err(end)) => break end,
            None => panic!("the slow watcher's stream neither ended nor went on"),
        }
    };
    assert!(
        seen < total,
        "the slow watcher should have been cut off, it got all {seen} events (last {last})"
    );
    assert_eq!(
        end,
        End::Clean,
        "a watcher that falls behind is ended, not cut"
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP, authentication, availability, kubeconfig
// ---------------------------------------------------------------------------------------------

#[test]
fn requests_without_the_bearer_token_get_401_status() {
    let api = server();
    request(&api, "GET", "/api/v1/services", None).expect_status(401, "Unauthorized");
    request(&api, "GET", "/api/v1/services", Some("wrong")).expect_status(401, "Unauthorized");
    request(&api, "GET", "/api/v1/services?watch=true", None).expect_status(401, "Unauthorized");
    assert_eq!(get(&api, "/api/v1/services").status, 200);
}

#[test]
fn unknown_paths_get_404_and_writes_get_405_status() {
    let api = server();
    for path in [
        "/api/v1/pods",
        "/api/v1/namespaces/default/nodes",
        "/apis/discovery.k8s.io/v1beta1/endpointslices",
        "/api/v1/namespaces/default/services/web/status",
        "/nothing",
    ] {
        get(&api, path).expect_status(404, "NotFound");
    }
    for method in ["POST", "PUT", "PATCH", "DELETE"] {
        request(
            &api,
            method,
            "/api/v1/namespaces/default/services/web",
            Some(api.token()),
        )
        .expect_status(405, "MethodNotAllowed");
    }
    let version = get_json(&api, "/version");
    assert_eq!(
        (version["major"].as_str(), version["minor"].as_str()),
        (Some("1"), Some("33"))
    );
    let health = get(&api, "/healthz");
    assert_eq!(
        (health.status, health.body.as_slice()),
        (200, b"ok".as_slice())
    );
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let api = server();
    api.create(&node("node-a")).unwrap();
    let mut stream = connect(api.addr());
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for _ in 0..3 {
        send(
            &mut stream,
            "GET",
            "/api/v1/nodes",
            Some(api.token()),
            false,
        )
        .unwrap();
        let (status, headers) = read_head(&mut reader).unwrap();
        let body = read_body(&mut reader, &headers).unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let list: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(names(&list), ["node-a"]);
    }
}

#[test]
fn an_unavailable_server_resets_connections_and_keeps_its_state() {
    let api = server();
    api.create(&node("node-a")).unwrap();
    let rv = api.resource_version();
    let mut watch = Watch::open(
        &api,
        &format!("/api/v1/nodes?watch=true&resourceVersion={rv}"),
    );
    eventually("the watch is open", || api.open_watches() == 1);

    api.set_available(false);
    assert_eq!(watch.end(), End::Abrupt, "open watches are cut");
    let mut stream = connect(api.addr());
    let answered = send(&mut stream, "GET", "/api/v1/nodes", Some(api.token()), true)
        .and_then(|()| read_head(&mut BufReader::new(stream)));
    assert!(
        answered.is_err(),
        "a down server answers nothing, got {answered:?}"
    );
    // Writes made while it is down are there when it comes back.
    api.create(&node("node-b")).unwrap();

    api.set_available(true);
    assert_eq!(
        names(&get_json(&api, "/api/v1/nodes")),
        ["node-a", "node-b"]
    );
    let mut resumed = Watch::open(
        &api,
        &format!("/api/v1/nodes?watch=true&resourceVersion={rv}"),
    );
    expect_event(&resumed.next(), "ADDED", "node-b");
}

#[test]
fn the_kubeconfig_names_the_server_and_the_token() {
    let api = server();
    let dir = std::env::temp_dir().join(format!("testbed-kubeconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config");
    api.write_kubeconfig(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        text.contains(&format!("server: http://{}\n", api.addr())),
        "{text}"
    );
    assert!(
        text.contains(&format!("token: {}\n", api.token())),
        "{text}"
    );
    assert!(text.contains("current-context: sluice-testbed\n"), "{text}");
}

#[test]
fn dropping_the_server_closes_its_port() {
    let api = server();
    let addr = api.addr();
    drop(api);
    assert!(
        TcpStream::connect(addr).is_err(),
        "nothing listens on {addr} any more"
    );
}
