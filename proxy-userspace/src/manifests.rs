//! Services, EndpointSlices and Nodes from a directory of YAML manifests.
//!
//! The directory holds what `kubectl apply -f DIR` takes: `*.yaml`, `*.yml` and `*.json` files,
//! each with one or more documents separated by `---` lines, any of them a `kind: List`.
//! Objects of kinds sluice does not read (Deployments, ConfigMaps, ...) are skipped, so the same
//! files can be applied to a cluster. A ConfigMap mounted as a volume works as the directory:
//! its `..data` links are hidden and skipped, and the file links are followed.
//!
//! Loading stops at the first problem, with the file, line and column where the parser or the
//! Kubernetes schema found it: the agent keeps its last good state until the files are fixed.
use std::{
    collections::BTreeMap,
    fmt, fs, io,
    path::{Path, PathBuf},
    time::SystemTime,
};

use k8s_openapi::{
    Resource,
    api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::model::ServiceKey;

/// The objects of a manifests directory.
#[derive(Default, Clone, Debug)]
pub struct Objects {
    pub services: BTreeMap<ServiceKey, Service>,
    /// Keyed by (namespace, name) of the slice itself.
    pub slices: BTreeMap<(String, String), EndpointSlice>,
    pub nodes: BTreeMap<String, Node>,
}

impl Objects {
    /// The slices that belong to the Service `key` (label `kubernetes.io/service-name`, same
    /// namespace).
    pub fn slices_of(&self, key: &ServiceKey) -> Vec<&EndpointSlice> {
        self.slices
            .range((key.namespace.clone(), String::new())..)
            .take_while(|((ns, _), _)| *ns == key.namespace)
            .map(|(_, slice)| slice)
            .filter(|slice| ServiceKey::of_slice(slice).as_ref() == Some(key))
            .collect()
    }
}

/// Why a manifests directory could not be loaded, and where.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", .file.display(), position(.line, .column))]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based, when known.
    pub line: Option<usize>,
    /// 1-based, when known.
    pub column: Option<usize>,
    pub message: String,
}

fn position(line: &Option<usize>, column: &Option<usize>) -> String {
    match (*line, *column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

impl ManifestError {
    fn new(file: &Path, line: Option<usize>, column: Option<usize>, message: String) -> Self {
        ManifestError {
            file: file.to_path_buf(),
            line,
            column,
            message,
        }
    }
}

/// Loads every manifest file of `dir` (see the module documentation), in name order.
pub fn load_dir(dir: &Path) -> Result<Objects, ManifestError> {
    let files = manifest_files(dir).map_err(|e| {
        ManifestError::new(
            dir,
            None,
            None,
            format!("cannot list the manifests directory: {e}"),
        )
    })?;
    let mut objects = Objects::default();
    let mut origins = Origins::new();
    for (file, _) in files {
        let text = fs::read_to_string(&file).map_err(|e| {
            ManifestError::new(&file, None, None, format!("cannot read the file: {e}"))
        })?;
        load_text(&file, &text, &mut objects, &mut origins)?;
    }
    Ok(objects)
}

/// Loads the documents of one file's `text` into `into`; `file` names it in errors. An object
/// already in `into` is a duplicate. On error, `into` holds the objects before the bad one.
pub fn load_str(file: &Path, text: &str, into: &mut Objects) -> Result<(), ManifestError> {
    load_text(file, text, into, &mut Origins::new())
}

/// A cheap fingerprint of the directory (names, sizes, mtimes of the files load_dir reads,
/// following symlinks as ConfigMap mounts use them) so a caller can poll for changes.
pub fn fingerprint(dir: &Path) -> io::Result<Vec<(PathBuf, u64, SystemTime)>> {
    manifest_files(dir)?
        .into_iter()
        .map(|(path, meta)| Ok((path, meta.len(), meta.modified()?)))
        .collect()
}

/// The files load_dir reads, sorted by name, with their (followed) metadata: `*.yaml`, `*.yml`
/// and `*.json` regular files, or links to them, directly in `dir`; hidden names skipped (a
/// ConfigMap volume's `..data` and `..2024_...` entries, editors' swap files).
fn manifest_files(dir: &Path) -> io::Result<Vec<(PathBuf, fs::Metadata)>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let is_manifest = path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json");
        if !is_manifest {
            continue;
        }
        // fs::metadata follows links, as a ConfigMap volume needs; a dangling link is an error
        // rather than a file silently left out.
        let meta = fs::metadata(&path)?;
        if meta.is_file() {
            files.push((path, meta));
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

/// Where an object was read, to name both places of a duplicate.
#[derive(Clone, Debug)]
struct Place {
    file: PathBuf,
    line: usize,
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ObjectId {
    Service(ServiceKey),
    Slice(String, String),
    Node(String),
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ObjectId::Service(key) => write!(f, "Service {key}"),
            ObjectId::Slice(ns, name) => write!(f, "EndpointSlice {ns}/{name}"),
            ObjectId::Node(name) => write!(f, "Node {name}"),
        }
    }
}

type Origins = BTreeMap<ObjectId, Place>;

/// One document of a file: its text (from its `---` line, if any) and the line it starts on.
struct Document<'a> {
    text: &'a str,
    first_line: usize,
}

impl Document<'_> {
    /// A line of this document as a line of the file.
    fn file_line(&self, line: u64) -> usize {
        (self.first_line + line as usize).saturating_sub(1).max(1)
    }
}

/// Splits a file at its `---` lines, as kubectl's YAML reader does, so each document can be
/// parsed on its own: into a plain value to find its kind, then into the type of that kind.
fn documents(text: &str) -> Vec<Document<'_>> {
    let mut docs = Vec::new();
    let (mut start, mut first_line) = (0, 1);
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        // A document marker: `---` at column 0, then whitespace or the end of the line.
        let marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']));
        if marker && offset > start {
            docs.push(Document {
                text: &text[start..offset],
                first_line,
            });
            (start, first_line) = (offset, i + 1);
        }
        offset += line.len();
    }
    docs.push(Document {
        text: &text[start..],
        first_line,
    });
    docs
}

fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! { with_snippet: false }
}

/// A parser error's message without the " at line L, column C" the location fields carry.
fn saphyr_message(e: &serde_saphyr::Error) -> String {
    let mut text = e.without_snippet().to_string();
    if let Some(l) = e.location() {
        let suffix = format!(" at line {}, column {}", l.line(), l.column());
        if text.ends_with(&suffix) {
            text.truncate(text.len() - suffix.len());
        }
    }
    // Hints about the parser's API, not for whoever edits the file.
    if matches!(
        e.without_snippet(),
        serde_saphyr::Error::MultipleDocuments { .. }
    ) {
        return "a second document starts here: separate documents with a `---` line".to_owned();
    }
    let hint = ", set DuplicateKeyPolicy in Options if acceptable";
    if text.ends_with(hint) {
        text.truncate(text.len() - hint.len());
    }
    text
}

fn load_text(
    file: &Path,
    text: &str,
    into: &mut Objects,
    origins: &mut Origins,
) -> Result<(), ManifestError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for doc in documents(text) {
        let parsed: Option<serde_saphyr::Spanned<Value>> =
            serde_saphyr::from_str_with_options(doc.text, yaml_options()).map_err(|e| {
                let (line, column) = match e.location() {
                    Some(l) => (Some(doc.file_line(l.line())), Some(l.column() as usize)),
                    None => (Some(doc.first_line), None),
                };
                ManifestError::new(file, line, column, saphyr_message(&e))
            })?;
        let Some(parsed) = parsed else { continue };
        if parsed.value.is_null() {
            continue;
        }
        let place = Place {
            file: file.to_path_buf(),
            line: doc.file_line(parsed.referenced.line()),
        };
        let mut loader = Loader {
            into,
            origins,
            doc: Some(&doc),
        };
        loader.object(parsed.value, place)?;
    }
    Ok(())
}

struct Loader<'a, 'd> {
    into: &'a mut Objects,
    origins: &'a mut Origins,
    /// The document's text, to locate schema errors in it; `None` for the items of a List
    /// (their errors are reported at the item's first line).
    doc: Option<&'a Document<'d>>,
}

impl Loader<'_, '_> {
    fn error(&self, place: &Place, message: String) -> ManifestError {
        ManifestError::new(&place.file, Some(place.line), None, message)
    }

    /// One object (or List of objects) at `place`.
    fn object(&mut self, value: Value, place: Place) -> Result<(), ManifestError> {
        let Value::Object(fields) = &value else {
            return Err(self.error(
                &place,
                format!(
                    "expected a Kubernetes object (a mapping with apiVersion, kind and \
                     metadata), found {}",
                    json_type(&value)
                ),
            ));
        };
        let kind = match fields.get("kind") {
            Some(Value::String(kind)) if !kind.is_empty() => kind.clone(),
            _ => {
                return Err(self.error(
                    &place,
                    "the object has no kind: every object needs apiVersion and kind, as for \
                     kubectl apply"
                        .to_owned(),
                ));
            }
        };
        let api_version = fields
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let api_version = api_version.as_str();
        match kind.as_str() {
            "Service" => {
                let mut svc: Service = self.typed(value, &place, api_version)?;
                default_namespace(&mut svc.metadata);
                let key = ServiceKey::of_service(&svc);
                self.insert(ObjectId::Service(key.clone()), place, |o| {
                    o.services.insert(key, svc);
                })
            }
            "EndpointSlice" => {
                let mut slice: EndpointSlice = self.typed(value, &place, api_version)?;
                default_namespace(&mut slice.metadata);
                let (ns, name) = (
                    slice.metadata.namespace.clone().unwrap_or_default(),
                    slice.metadata.name.clone().unwrap_or_default(),
                );
                if ServiceKey::of_slice(&slice).is_none() {
                    tracing::debug!(
                        file = %place.file.display(), line = place.line, slice = %name,
                        "EndpointSlice without the kubernetes.io/service-name label: no Service uses it"
                    );
                }
                self.insert(ObjectId::Slice(ns.clone(), name.clone()), place, |o| {
                    o.slices.insert((ns, name), slice);
                })
            }
            "Node" => {
                let node: Node = self.typed(value, &place, api_version)?;
                let name = node.metadata.name.clone().unwrap_or_default();
                self.insert(ObjectId::Node(name.clone()), place, |o| {
                    o.nodes.insert(name, node);
                })
            }
            // `kind: List` and the typed lists (ServiceList, ...) that `kubectl get -o yaml`
            // writes: the objects are the items.
            list if list.ends_with("List") => self.list(value, place),
            other => {
                tracing::debug!(
                    file = %place.file.display(), line = place.line, kind = other,
                    "ignoring an object of a kind sluice does not read"
                );
                Ok(())
            }
        }
    }

    fn list(&mut self, value: Value, place: Place) -> Result<(), ManifestError> {
        let Value::Object(mut fields) = value else {
            unreachable!("object() checked that the value is a mapping")
        };
        let items = match fields.remove("items") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::Array(items)) => items,
            Some(other) => {
                return Err(self.error(
                    &place,
                    format!(
                        "the items of a List must be a sequence, found {}",
                        json_type(&other)
                    ),
                ));
            }
        };
        let lines = self.doc.map(item_lines).unwrap_or_default();
        let mut items_loader = Loader {
            into: &mut *self.into,
            origins: &mut *self.origins,
            doc: None,
        };
        for (i, item) in items.into_iter().enumerate() {
            let item_place = Place {
                file: place.file.clone(),
                line: lines.get(i).copied().unwrap_or(place.line),
            };
            items_loader.object(item, item_place)?;
        }
        Ok(())
    }

    /// The object as its k8s-openapi type, with apiVersion and metadata.name checked.
    ///
    /// The value is converted as JSON, as `kubectl apply` converts YAML to JSON before the API
    /// server decodes it, so a manifest is read the same way here and there (`port: "80"` is
    /// refused by both). The parser does not track positions through that conversion, so when
    /// it fails the document is parsed again straight into the type, only to find the line and
    /// column of the offending field.
    fn typed<T: Resource + DeserializeOwned>(
        &self,
        value: Value,
        place: &Place,
        api_version: &str,
    ) -> Result<T, ManifestError> {
        if api_version != T::API_VERSION {
            return Err(self.error(
                place,
                format!(
                    "{} with apiVersion {api_version:?}: sluice reads {} objects of apiVersion {}; \
                     change apiVersion to {}",
                    T::KIND,
                    T::KIND,
                    T::API_VERSION,
                    T::API_VERSION
                ),
            ));
        }
        let name = value
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .map(str::to_owned);
        let Some(name) = name else {
            return Err(self.error(
                place,
                format!(
                    "the {} has no metadata.name (generateName is not supported here)",
                    T::KIND
                ),
            ));
        };
        serde_json::from_value::<T>(value).map_err(|e| {
            let (line, column) = self
                .doc
                .and_then(locate::<T>)
                .map_or((place.line, None), |(l, c)| (l, Some(c)));
            ManifestError::new(
                &place.file,
                Some(line),
                column,
                format!(
                    "{} {name:?} does not match the Kubernetes schema: {e}",
                    T::KIND
                ),
            )
        })
    }

    /// Records the object unless it is already there; `add` inserts it.
    fn insert(
        &mut self,
        id: ObjectId,
        place: Place,
        add: impl FnOnce(&mut Objects),
    ) -> Result<(), ManifestError> {
        let present = match &id {
            ObjectId::Service(key) => self.into.services.contains_key(key),
            ObjectId::Slice(ns, name) => self.into.slices.contains_key(&(ns.clone(), name.clone())),
            ObjectId::Node(name) => self.into.nodes.contains_key(name),
        };
        if present || self.origins.contains_key(&id) {
            let first = match self.origins.get(&id) {
                Some(first) => format!("first at {first}"),
                None => "first in what was loaded before this file".to_owned(),
            };
            return Err(self.error(
                &place,
                format!("{id} is defined twice: {first}, again here; remove one of them"),
            ));
        }
        add(self.into);
        self.origins.insert(id, place);
        Ok(())
    }
}

/// Sets metadata.namespace to `default` when it is missing, as kubectl apply does.
fn default_namespace(meta: &mut ObjectMeta) {
    if meta.namespace.as_deref().is_none_or(str::is_empty) {
        meta.namespace = Some("default".to_owned());
    }
}

/// Where the parser fails to read the document as a `T`, as a line and column of the file.
fn locate<T: DeserializeOwned>(doc: &Document<'_>) -> Option<(usize, usize)> {
    // no_schema: an unquoted number or boolean is not taken as a string, as JSON would not.
    let options = serde_saphyr::options! { with_snippet: false, no_schema: true };
    let e = serde_saphyr::from_str_with_options::<T>(doc.text, options).err()?;
    let l = e.location()?;
    Some((doc.file_line(l.line()), l.column() as usize))
}

/// The first line of each item of a List document.
fn item_lines(doc: &Document<'_>) -> Vec<usize> {
    #[derive(serde::Deserialize)]
    struct Items {
        #[serde(default)]
        items: Vec<serde_saphyr::Spanned<serde::de::IgnoredAny>>,
    }
    serde_saphyr::from_str_with_options::<Items>(doc.text, yaml_options())
        .map(|list| {
            list.items
                .iter()
                .map(|item| doc.file_line(item.referenced.line()))
                .collect()
        })
        .unwrap_or_default()
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    use super::*;

    /// A directory under the system temp dir, removed on drop (also when the test panics).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(test: &str) -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "sluice-manifests-{test}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create a temp dir");
            TempDir(path)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, text).expect("write a test file");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[track_caller]
    fn load_err(dir: &TempDir) -> ManifestError {
        match load_dir(&dir.0) {
            Err(e) => e,
            Ok(o) => panic!("expected an error, loaded {o:?}"),
        }
    }

    const SERVICE_WEB: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  clusterIP: 10.96.0.10
  ports:
    - port: 80
";

    #[test]
    fn the_example_manifest_loads() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/service-test.yaml");
        let text = fs::read_to_string(&path).expect("read the example");
        let mut objects = Objects::default();
        load_str(&path, &text, &mut objects)
            .unwrap_or_else(|e| panic!("the example must load: {e}"));

        let key = ServiceKey::new("default", "service-test");
        let svc = objects
            .services
            .get(&key)
            .expect("Service default/service-test");
        let port = &svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
        assert_eq!(port.target_port, Some(IntOrString::String("http".into())));
        let slices = objects.slices_of(&key);
        assert_eq!(slices.len(), 1, "one EndpointSlice for the Service");
        assert_eq!(slices[0].endpoints.len(), 2);
        assert_eq!(objects.services.len(), 1, "the Deployment is not a Service");
    }

    #[test]
    fn every_document_of_a_multi_document_file_is_loaded() {
        let dir = TempDir::new("multi");
        dir.write(
            "all.yaml",
            "---\n# leading marker and a comment-only document\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: shop}\n\
             --- # a comment after the marker\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: b}\n\
             ---\n\n---\n\
             apiVersion: v1\nkind: Node\nmetadata: {name: node0, namespace: ignored}\n\
             ...\n",
        );
        let objects = load_dir(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        let keys: Vec<String> = objects.services.keys().map(ToString::to_string).collect();
        assert_eq!(keys, ["default/b", "shop/a"]);
        assert_eq!(
            objects.services[&ServiceKey::new("default", "b")]
                .metadata
                .namespace
                .as_deref(),
            Some("default"),
            "a missing namespace becomes default"
        );
        assert!(objects.nodes.contains_key("node0"));
    }

    #[test]
    fn the_items_of_a_list_are_loaded() {
        let dir = TempDir::new("list");
        dir.write(
            "list.yaml",
            "apiVersion: v1\nkind: List\nitems:\n\
             - apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n\
             - apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n\
             \x20 metadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\n\
             \x20 addressType: IPv4\n  endpoints: []\n\
             - apiVersion: apps/v1\n  kind: Deployment\n  metadata: {name: a}\n",
        );
        let objects = load_dir(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        let key = ServiceKey::new("default", "a");
        assert!(objects.services.contains_key(&key));
        assert_eq!(objects.slices_of(&key).len(), 1);
    }

    #[test]
    fn objects_of_other_kinds_are_ignored() {
        let dir = TempDir::new("kinds");
        dir.write(
            "app.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {port: \"80\"}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec: {replicas: 2}\n---\n\
             apiVersion: example.com/v1\nkind: Widget\nspec: [1, 2]\n",
        );
        let objects = load_dir(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            objects.services.is_empty() && objects.slices.is_empty() && objects.nodes.is_empty()
        );
    }

    #[test]
    fn a_yaml_syntax_error_is_reported_at_its_line() {
        let dir = TempDir::new("syntax");
        let file = dir.write(
            "bad.yaml",
            // Line 13 has a second `:` where a plain value cannot have one.
            &format!("{SERVICE_WEB}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web: oops\nspec: {{}}\n"),
        );
        let e = load_err(&dir);
        assert_eq!(e.file, file);
        assert_eq!(e.line, Some(13), "error: {e}");
        assert!(e.column.is_some(), "the parser gives a column: {e}");
    }

    #[test]
    fn content_after_a_document_end_without_a_marker_is_reported() {
        let dir = TempDir::new("docend");
        dir.write("x.yaml", &format!("{SERVICE_WEB}...\nkind: Service\n"));
        let e = load_err(&dir);
        assert_eq!(e.line, Some(10), "error: {e}");
        assert!(
            e.message.contains("`---`"),
            "the message should say what to do: {e}"
        );
    }

    #[test]
    fn a_bad_indentation_is_reported_at_its_line() {
        let dir = TempDir::new("indent");
        dir.write(
            "bad.yaml",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n   namespace: x\n",
        );
        let e = load_err(&dir);
        assert_eq!(e.line, Some(5), "error: {e}");
    }

    #[test]
    fn a_field_of_the_wrong_type_is_reported_with_file_and_line() {
        let dir = TempDir::new("type");
        let file = dir.write(
            "web.yaml",
            &format!("{SERVICE_WEB}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: api\nspec:\n  ports:\n    - name: http\n      port: \"eighty\"\n"),
        );
        let e = load_err(&dir);
        assert_eq!(e.file, file);
        assert_eq!(e.line, Some(17), "the line of `port: \"eighty\"`: {e}");
        assert!(
            e.message.contains("Service \"api\"") && e.message.contains("eighty"),
            "the message should name the object and the value: {e}"
        );
        assert!(
            e.to_string()
                .starts_with(&format!("{}:17:", file.display())),
            "display: {e}"
        );
    }

    #[test]
    fn a_wrong_item_of_a_list_is_reported_at_the_item() {
        let dir = TempDir::new("listtype");
        dir.write(
            "list.yaml",
            "apiVersion: v1\nkind: List\nitems:\n\
             - apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n\
             - apiVersion: v1\n  kind: Service\n  metadata: {name: b}\n  spec: {ports: 80}\n",
        );
        let e = load_err(&dir);
        assert_eq!(e.line, Some(7), "the line of the second item: {e}");
    }

    #[test]
    fn objects_sluice_reads_must_have_the_right_api_version_and_a_name() {
        let cases = [
            (
                "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: x}\naddressType: IPv4\nendpoints: []\n",
                "change apiVersion to discovery.k8s.io/v1",
            ),
            (
                "apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n",
                "no metadata.name",
            ),
            ("apiVersion: v1\nmetadata: {name: x}\n", "no kind"),
            ("- just\n- a list\n", "expected a Kubernetes object"),
        ];
        for (text, expected) in cases {
            let dir = TempDir::new("checks");
            dir.write("x.yaml", text);
            let e = load_err(&dir);
            assert!(
                e.message.contains(expected),
                "for {text:?}: {e} should say {expected:?}"
            );
            assert_eq!(e.line, Some(1), "for {text:?}: {e}");
        }
    }

    #[test]
    fn an_object_defined_twice_is_reported_with_both_places() {
        let dir = TempDir::new("dup");
        let first = dir.write("a.yaml", SERVICE_WEB);
        let second = dir.write(
            "b.yaml",
            &format!("# the same Service again\n{SERVICE_WEB}"),
        );
        let e = load_err(&dir);
        assert_eq!(e.file, second);
        assert_eq!(e.line, Some(2));
        assert!(
            e.message.contains("Service default/web is defined twice")
                && e.message.contains(&format!("{}:1", first.display())),
            "the message should name the first place: {e}"
        );
    }

    #[test]
    fn json_files_are_read_too() {
        let dir = TempDir::new("json");
        dir.write(
            "svc.json",
            "{\n\t\"apiVersion\": \"v1\", \"kind\": \"Service\",\n\t\"metadata\": {\"name\": \"web\"},\n\t\"spec\": {\"ports\": [{\"port\": 80}]}\n}\n",
        );
        let objects = load_dir(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            objects
                .services
                .contains_key(&ServiceKey::new("default", "web"))
        );
    }

    #[test]
    fn hidden_files_and_other_extensions_are_skipped() {
        let dir = TempDir::new("hidden");
        dir.write("web.yaml", SERVICE_WEB);
        dir.write(".web.yaml.swp", "not yaml: [");
        dir.write(".hidden.yaml", "not yaml: [");
        dir.write("README.md", "not yaml: [");
        fs::create_dir(dir.0.join("..data")).unwrap();
        fs::write(dir.0.join("..data").join("other.yaml"), "not yaml: [").unwrap();
        let objects = load_dir(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(objects.services.len(), 1);
    }

    #[test]
    fn a_configmap_volume_is_read_through_its_links() {
        // The layout the kubelet writes: DIR/web.yaml -> ..data/web.yaml, ..data -> ..<stamp>.
        let dir = TempDir::new("configmap");
        let stamp = dir.0.join("..2025_01_01_00_00_00.1");
        fs::create_dir(&stamp).unwrap();
        fs::write(stamp.join("web.yaml"), SERVICE_WEB).unwrap();
        std::os::unix::fs::symlink("..2025_01_01_00_00_00.1", dir.0.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/web.yaml", dir.0.join("web.yaml")).unwrap();
        let objects = load_dir(&dir.0).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(objects.services.len(), 1);
        let print = fingerprint(&dir.0).unwrap();
        assert_eq!(print.len(), 1);
        assert_eq!(print[0].0, dir.0.join("web.yaml"));
        assert_eq!(
            print[0].1,
            SERVICE_WEB.len() as u64,
            "the size of the target, not the link"
        );
    }

    #[test]
    fn the_fingerprint_changes_when_a_file_changes() {
        let dir = TempDir::new("fingerprint");
        let file = dir.write("web.yaml", SERVICE_WEB);
        let before = fingerprint(&dir.0).unwrap();
        assert_eq!(
            before,
            fingerprint(&dir.0).unwrap(),
            "stable while nothing changes"
        );

        // Same size, new content: only the mtime tells.
        fs::write(&file, SERVICE_WEB.replace("web", "api")).unwrap();
        let later = SystemTime::now() + std::time::Duration::from_secs(5);
        fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        let edited = fingerprint(&dir.0).unwrap();
        assert_ne!(before, edited, "an edit must change the fingerprint");

        dir.write("more.yml", SERVICE_WEB);
        let added = fingerprint(&dir.0).unwrap();
        assert_eq!(added.len(), 2, "a new file must appear: {added:?}");
    }
}
