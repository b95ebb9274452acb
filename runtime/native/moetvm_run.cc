// moetvm-run: greedy decode of a moetvm artifact with no Python in the process.
//
// What a board runs when the model fits in memory: every expert resident, each token one call of
// the artifact's decode step (artifact.DecodeStep). The Python runtime (runtime/model.py) does
// the same on that path; this binary exists for what Python costs beside the weights: ~50 MB of
// interpreter, NumPy and tokenizer (at fp32 GraniteMoE, the gap to llama.cpp's peak RSS). It
// reads the artifact as the Python runtime does, as untrusted input: every file's size and
// SHA-256 checked on the very bytes used (libraries loaded from a sealed memory file), every
// weight file's tensors checked against the manifest, and the prompt run through the
// per-segment functions, which check the weights' and pools' shapes, before the one-call step
// (which does not). Token ids in and out: no tokenizer, no sampling, no expert cache. Anything
// it does not cover is refused with its reason.
#include <dlpack/dlpack.h>
#include <fcntl.h>
#include <malloc.h>
#include <openssl/evp.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/json.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

// The artifact formats this reader knows (moetvm/artifact.py: format 13 added the decode step;
// a test keeps the upper bound equal to artifact.FORMAT_VERSION).
constexpr int64_t kMinFormat = 13, kMaxFormat = 15;
constexpr size_t kAlign = 64;          // where every tensor starts (the kernels' vector alignment)
constexpr size_t kHugePage = 2 << 20;  // weights are read through 2 MB pages (runtime/host_memory.py)
constexpr size_t kReadChunk = 8 << 20;
constexpr int kNaiveAllocator = 1, kPooledAllocator = 2;  // tvm/runtime/vm.py's allocator kinds
constexpr int64_t kPrefillChunk = 128;  // prompt positions a prefill call takes (runtime/model.py's PREFILL_CHUNK)

// A refusal or failure: one line, exit status 2 (runtime/model.py's ArtifactError and
// InputError: the artifact or the request, never a crash).
struct Refusal : std::runtime_error {
  using std::runtime_error::runtime_error;
};
[[noreturn]] void refuse(const std::string& message) { throw Refusal(message); }

// --- the manifest: JSON through tvm_ffi's parser, each field checked where it is read ---------
using Json = ffi::Any;
using JsonObject = ffi::Map<ffi::Any, ffi::Any>;
using JsonArray = ffi::Array<ffi::Any>;

const JsonObject object(const Json& v, const std::string& what) {
  auto o = v.try_cast<JsonObject>();
  if (!o) refuse("manifest.json: " + what + " is not an object");
  return *o;
}
JsonArray array(const Json& v, const std::string& what) {
  auto a = v.try_cast<JsonArray>();
  if (!a) refuse("manifest.json: " + what + " is not a list");
  return *a;
}
bool has(const JsonObject& o, const char* key) {
  auto it = o.find(ffi::String(key));
  return it != o.end() && (*it).second != nullptr;
}
Json get(const JsonObject& o, const char* key, const std::string& what) {
  auto it = o.find(ffi::String(key));
  if (it == o.end()) refuse("manifest.json: " + what + " lacks '" + key + "'");
  return (*it).second;
}
std::string text(const JsonObject& o, const char* key, const std::string& what) {
  auto s = get(o, key, what).try_cast<ffi::String>();
  if (!s) refuse("manifest.json: " + what + "." + key + " is not a string");
  return std::string(*s);
}
int64_t integer(const Json& v, const std::string& what) {
  if (v.type_index() != ffi::TypeIndex::kTVMFFIInt) refuse("manifest.json: " + what + " is not an integer");
  return v.cast<int64_t>();
}
int64_t integer(const JsonObject& o, const char* key, const std::string& what) {
  return integer(get(o, key, what), what + "." + key);
}
std::vector<std::string> texts(const Json& v, const std::string& what) {
  std::vector<std::string> out;
  for (const Json& item : array(v, what)) {
    auto s = item.try_cast<ffi::String>();
    if (!s) refuse("manifest.json: " + what + " holds a non-string");
    out.emplace_back(*s);
  }
  return out;
}

struct FileRef {
  std::string path;
  int64_t size = 0;
  std::string sha256;
};
FileRef file_ref(const Json& v, const std::string& what) {
  JsonObject o = object(v, what);
  FileRef ref{text(o, "path", what), integer(o, "size", what), text(o, "sha256", what)};
  if (ref.size < 0) refuse("manifest.json: " + what + " has a negative size");
  return ref;
}

struct TensorSpec {
  std::string name, dtype;
  std::vector<int64_t> shape;
  int64_t lookup_rows = 0;  // a table gathered at token ids, slice i holding rows [i * rows, (i + 1) * rows)
  int64_t bytes() const;
};
DLDataType dl_dtype(const std::string& name) {
  static const std::map<std::string, DLDataType> known = {
      {"float32", {kDLFloat, 32, 1}}, {"float16", {kDLFloat, 16, 1}}, {"bfloat16", {kDLBfloat, 16, 1}},
      {"int8", {kDLInt, 8, 1}},       {"uint8", {kDLUInt, 8, 1}},     {"int32", {kDLInt, 32, 1}},
      {"int64", {kDLInt, 64, 1}}};
  auto it = known.find(name);
  if (it == known.end()) refuse("manifest.json: unknown dtype '" + name + "'");
  return it->second;
}
int64_t TensorSpec::bytes() const {
  int64_t n = dl_dtype(dtype).bits / 8;
  for (int64_t d : shape) {
    if (d < 0 || (d && n > INT64_MAX / d)) refuse("manifest.json: tensor " + name + " has an impossible shape");
    n *= d;
  }
  return n;
}
TensorSpec tensor_spec(const Json& v, const std::string& what) {
  JsonObject o = object(v, what);
  TensorSpec spec{text(o, "name", what), text(o, "dtype", what), {}};
  for (const Json& d : array(get(o, "shape", what), what + ".shape")) spec.shape.push_back(integer(d, what + ".shape"));
  dl_dtype(spec.dtype);
  if (has(o, "lookup_rows")) {
    spec.lookup_rows = integer(o, "lookup_rows", what);
    if (spec.lookup_rows <= 0 || spec.shape.size() < 2) refuse("manifest.json: tensor " + spec.name + ": bad lookup_rows");
  }
  return spec;
}

struct Step {
  std::string op, name;
  std::vector<std::string> inputs, outputs;
  int64_t layer = -1;
  bool per_position = false;  // its outputs at a position depend on its inputs there alone
};
struct Workload {
  std::string library;
  std::vector<TensorSpec> params;
  std::vector<int64_t> slot_offsets;
  int64_t slot_bytes = 0;
};
struct MoELayer {
  int64_t n_experts = 0, d_model = 0;
  std::string router_library, router_function, resident_function, decode_function;
  std::vector<FileRef> experts;  // by expert index
  std::string workload;
};
struct WeightFile {
  FileRef file;
  std::vector<TensorSpec> tensors;
};
struct Manifest {
  std::vector<std::pair<std::string, FileRef>> libraries;
  std::vector<TensorSpec> inputs;
  std::set<std::string> outputs;
  std::vector<Step> program;
  std::map<std::string, Workload> workloads;
  std::map<int64_t, MoELayer> moe_layers;
  std::vector<WeightFile> weights;
  std::string decode_function;
  std::vector<std::string> decode_inputs, decode_weights;
  int64_t vocab = 0, max_positions = 0, capacity_multiple = 1, block = 0;
  std::string kv_dtype;
  std::vector<int64_t> eos;
};

std::string read_small_file(const std::string& path, size_t limit) {
  int fd = open(path.c_str(), O_RDONLY | O_NOFOLLOW);
  if (fd < 0) refuse(path + ": cannot read (" + std::strerror(errno) + ")");
  std::string data;
  char chunk[1 << 16];
  ssize_t got;
  while ((got = read(fd, chunk, sizeof chunk)) > 0) {
    data.append(chunk, got);
    if (data.size() > limit) {
      close(fd);
      refuse(path + ": larger than " + std::to_string(limit >> 20) + " MB");
    }
  }
  close(fd);
  if (got < 0) refuse(path + ": cannot read (" + std::strerror(errno) + ")");
  return data;
}

Manifest read_manifest(const std::string& root) {
  ffi::String error;
  Json parsed = ffi::json::Parse(read_small_file(root + "/manifest.json", 256 << 20), &error);
  if (!error.empty()) refuse("manifest.json: not valid JSON (" + std::string(error) + ")");
  JsonObject m = object(parsed, "the manifest");
  int64_t version = integer(m, "format_version", "the manifest");
  if (version < kMinFormat || version > kMaxFormat)
    refuse("manifest.json: format " + std::to_string(version) + "; moetvm-run reads formats " +
           std::to_string(kMinFormat) + " to " + std::to_string(kMaxFormat));
  if (text(m, "kind", "the manifest") != "causal_lm") refuse("moetvm-run decodes causal LM artifacts only");
  Manifest out;
  JsonObject target = object(get(m, "target", "the manifest"), "target");
  if (has(target, "device") && text(target, "device", "target") != "cpu")
    refuse("moetvm-run runs CPU artifacts; this one is for " + text(target, "device", "target") +
           " (use `moetvm run`)");
  if (has(m, "encryption"))
    refuse("the artifact's weights are encrypted; moetvm-run does not decrypt (use `moetvm run --decrypt-key`)");

  JsonObject model = object(get(m, "model", "the manifest"), "model");
  out.vocab = integer(model, "vocab_size", "model");
  out.max_positions = has(model, "max_positions") ? integer(model, "max_positions", "model") : 0;
  JsonObject kv = object(get(model, "kv_cache", "model"), "model.kv_cache");
  if (text(kv, "layout", "model.kv_cache") != "in_place")
    refuse("the artifact's KV cache is not in place; moetvm-run needs one (use `moetvm run`)");
  if (array(get(kv, "states", "model.kv_cache"), "model.kv_cache.states").size() ||
      (has(kv, "full_layers") && array(get(kv, "full_layers", "model.kv_cache"), "full_layers").size()) ||
      has(kv, "window") || has(kv, "chunk"))
    refuse("the artifact's attention keeps states, a window or chunks; moetvm-run covers full attention only "
           "(use `moetvm run`)");
  if (!has(m, "decode_step"))
    refuse("the artifact has no one-call decode step (recompile it with this moetvm, or use `moetvm run`)");
  out.kv_dtype = text(kv, "dtype", "model.kv_cache");
  out.capacity_multiple = integer(kv, "capacity_multiple", "model.kv_cache");
  out.block = has(kv, "block") ? integer(kv, "block", "model.kv_cache") : 0;
  if (out.capacity_multiple <= 0 || out.block < 0 || (out.block && out.capacity_multiple % out.block))
    refuse("manifest.json: model.kv_cache: capacity multiple and block disagree");

  for (const Json& v : array(get(m, "libraries", "the manifest"), "libraries")) {
    JsonObject lib = object(v, "a library");
    out.libraries.emplace_back(text(lib, "name", "a library"), file_ref(get(lib, "file", "a library"), "a library"));
  }
  for (const Json& v : array(get(m, "inputs", "the manifest"), "inputs")) {
    JsonObject o = object(v, "an input");
    TensorSpec spec{text(o, "name", "an input"), text(o, "dtype", "an input"), {}};
    for (const Json& d : array(get(o, "shape", "an input"), "an input's shape"))  // symbolic: -1
      spec.shape.push_back(d.type_index() == ffi::TypeIndex::kTVMFFIInt ? d.cast<int64_t>() : -1);
    out.inputs.push_back(spec);
  }
  for (const Json& v : array(get(m, "outputs", "the manifest"), "outputs"))
    out.outputs.insert(text(object(v, "an output"), "name", "an output"));
  for (const Json& v : array(get(m, "program", "the manifest"), "program")) {
    JsonObject o = object(v, "a program step");
    Step step{text(o, "op", "a step"), text(o, "name", "a step"), texts(get(o, "inputs", "a step"), "a step's inputs"),
              texts(get(o, "outputs", "a step"), "a step's outputs")};
    if (step.op == "moe") step.layer = integer(o, "layer", "a step");
    if (has(o, "per_position")) {
      auto flag = get(o, "per_position", "a step").try_cast<bool>();
      if (!flag || get(o, "per_position", "a step").type_index() != ffi::TypeIndex::kTVMFFIBool)
        refuse("manifest.json: step " + step.name + ": per_position is not true or false");
      step.per_position = *flag;
    }
    else if (step.op != "segment") refuse("manifest.json: unknown program step '" + step.op + "'");
    if ((step.op == "moe" && (step.inputs.size() != 1 || step.outputs.size() != 1)))
      refuse("manifest.json: MoE step " + step.name + " must take one input and give one output");
    out.program.push_back(step);
  }
  for (const Json& v : array(get(m, "workloads", "the manifest"), "workloads")) {
    JsonObject o = object(v, "a workload");
    Workload w{text(o, "library", "a workload"), {}, {}, has(o, "slot_bytes") ? integer(o, "slot_bytes", "a workload") : 0};
    for (const Json& p : array(get(o, "params", "a workload"), "a workload's params")) w.params.push_back(tensor_spec(p, "a param"));
    if (has(o, "slot_offsets"))
      for (const Json& s : array(get(o, "slot_offsets", "a workload"), "slot offsets")) w.slot_offsets.push_back(integer(s, "a slot offset"));
    out.workloads[text(o, "id", "a workload")] = w;
  }
  for (const Json& v : array(get(m, "moe_layers", "the manifest"), "moe_layers")) {
    JsonObject o = object(v, "an MoE layer");
    int64_t index = integer(o, "layer", "an MoE layer");
    std::string what = "MoE layer " + std::to_string(index);
    JsonObject router = object(get(o, "router", what), what + ".router");
    MoELayer layer;
    layer.n_experts = integer(router, "n_experts", what + ".router");
    layer.d_model = integer(o, "d_model", what);
    layer.router_library = text(router, "library", what + ".router");
    layer.router_function = text(router, "function", what + ".router");
    if (text(router, "mode", what + ".router") != "learned")
      refuse(what + ": fixed-pattern routing runs in `moetvm run`; moetvm-run runs learned routers");
    if (!has(o, "resident_function")) refuse(what + ": no resident function (use `moetvm run`)");
    layer.resident_function = text(o, "resident_function", what);
    layer.decode_function = has(o, "decode_function") ? text(o, "decode_function", what) : "";
    if (array(get(o, "shared", what), what + ".shared").size())
      refuse(what + ": shared experts run in `moetvm run`; moetvm-run covers routed experts only");
    layer.experts.resize(layer.n_experts);
    std::vector<bool> seen(layer.n_experts);
    for (const Json& e : array(get(o, "experts", what), what + ".experts")) {
      JsonObject expert = object(e, what + "'s expert");
      int64_t i = integer(expert, "index", what + "'s expert");
      if (i < 0 || i >= layer.n_experts || seen[i]) refuse("manifest.json: " + what + ": expert index " + std::to_string(i));
      seen[i] = true;
      std::string workload = text(expert, "workload", what);
      if (!layer.workload.empty() && workload != layer.workload) refuse(what + ": experts of several workloads");
      layer.workload = workload;
      layer.experts[i] = file_ref(get(expert, "file", what), what + "'s expert");
    }
    if (std::count(seen.begin(), seen.end(), true) != layer.n_experts) refuse("manifest.json: " + what + " lacks experts");
    auto w = out.workloads.find(layer.workload);
    if (w == out.workloads.end() || w->second.slot_bytes <= 0 || w->second.slot_offsets.size() != w->second.params.size())
      refuse("manifest.json: " + what + ": its workload has no slot layout");
    out.moe_layers[index] = layer;
  }
  for (const Json& v : array(get(m, "weights", "the manifest"), "weights")) {
    JsonObject o = object(v, "a weight file");
    WeightFile wf{file_ref(get(o, "file", "a weight file"), "a weight file"), {}};
    for (const Json& t : array(get(o, "tensors", "a weight file"), "its tensors")) wf.tensors.push_back(tensor_spec(t, "a weight"));
    out.weights.push_back(wf);
  }
  JsonObject step = object(get(m, "decode_step", "the manifest"), "decode_step");
  out.decode_function = text(step, "function", "decode_step");
  out.decode_inputs = texts(get(step, "inputs", "decode_step"), "decode_step.inputs");
  out.decode_weights = texts(get(step, "weights", "decode_step"), "decode_step.weights");
  if (has(m, "tokenizer")) {
    JsonObject tok = object(get(m, "tokenizer", "the manifest"), "tokenizer");
    // As runtime/tokenizer.py: a Hugging Face tokenizer's end-of-sequence ids end a generation;
    // the byte tokenizer has none.
    if (text(tok, "kind", "tokenizer") == "hf" && has(tok, "eos_token_ids"))
      for (const Json& id : array(get(tok, "eos_token_ids", "tokenizer"), "eos ids")) out.eos.push_back(integer(id, "an eos id"));
  }
  return out;
}

// --- files: read once, hashed where they land (moetvm/artifact.py's _verified_chunks) ---------
std::string real_path(const std::string& path) {
  char buf[PATH_MAX];
  if (!realpath(path.c_str(), buf)) return "";
  return buf;
}

// A relative path with no '..' component, backslash or control character
// (artifact.safe_relative_path); symbolic links are refused by where they resolve.
bool relative_inside(const std::string& path) {
  if (path.empty() || path[0] == '/') return false;
  for (unsigned char c : path)
    if (c < 32 || c == '\\') return false;
  std::stringstream parts(path);
  for (std::string part; std::getline(parts, part, '/');)
    if (part == "..") return false;
  return true;
}

class VerifiedFile {
 public:
  VerifiedFile(const std::string& root, const FileRef& ref) : ref_(ref) {
    if (!relative_inside(ref.path)) refuse("manifest.json: path '" + ref.path + "' escapes the artifact directory");
    std::string real_root = real_path(root), full = real_path(root + "/" + ref.path);
    if (full.empty()) refuse(ref.path + ": missing from the artifact");
    if (full.compare(0, real_root.size() + 1, real_root + "/") != 0) refuse(ref.path + ": resolves outside the artifact directory");
    fd_ = open(full.c_str(), O_RDONLY | O_NOFOLLOW);
    if (fd_ < 0) refuse(ref.path + ": cannot read the file (" + std::strerror(errno) + ")");
    struct stat info;
    if (fstat(fd_, &info) || !S_ISREG(info.st_mode)) refuse(ref.path + ": the file is not a regular file");
    if (info.st_size != ref.size)
      refuse(ref.path + ": size " + std::to_string(info.st_size) + " bytes, manifest says " + std::to_string(ref.size) +
             " (truncated or replaced)");
    hash_ = EVP_MD_CTX_new();
    EVP_DigestInit_ex(hash_, EVP_sha256(), nullptr);
  }
  ~VerifiedFile() {
    if (fd_ >= 0) close(fd_);
    EVP_MD_CTX_free(hash_);
  }
  // The file's first bytes without consuming them (where to place the rest depends on them).
  std::string peek(size_t n) {
    std::string out(std::min<size_t>(n, ref_.size), '\0');
    if (pread(fd_, out.data(), out.size(), 0) != static_cast<ssize_t>(out.size())) refuse(ref_.path + ": cannot read");
    return out;
  }
  // The next n bytes, read into dst and hashed there.
  void read_into(char* dst, size_t n) {
    while (n) {
      ssize_t got = pread(fd_, dst, std::min(n, kReadChunk), done_);
      if (got <= 0) refuse(ref_.path + ": truncated while read");
      EVP_DigestUpdate(hash_, dst, got);
      dst += got, n -= got, done_ += got;
    }
  }
  // After the last byte: the size and SHA-256 the manifest gives, or a refusal.
  void finish() {
    char extra;
    if (done_ != ref_.size || pread(fd_, &extra, 1, done_) != 0) refuse(ref_.path + ": size changed while read");
    unsigned char digest[32];
    unsigned int length = 0;
    EVP_DigestFinal_ex(hash_, digest, &length);
    char hex[65];
    for (int i = 0; i < 32; ++i) std::snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    if (ref_.sha256 != hex) refuse(ref_.path + ": SHA-256 mismatch (corrupted or tampered)");
  }
  int64_t size() const { return ref_.size; }
  int duplicate() const { return dup(fd_); }  // this very file, for reads after the check

 private:
  FileRef ref_;
  int fd_ = -1;
  EVP_MD_CTX* hash_ = nullptr;
  int64_t done_ = 0;
};

// Anonymous memory advised for huge pages (runtime/host_memory.py): what every token streams.
// The mapping starts on a huge-page boundary and ends at the last 4 KB page it needs: a tail
// shorter than a huge page takes small pages (a huge one there would back up to 2 MB unused).
class HostBlock {
 public:
  explicit HostBlock(size_t bytes) {
    size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    length_ = std::max<size_t>(page, (bytes + page - 1) / page * page);
    size_t mapped = length_ + kHugePage;
    void* base = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) refuse("cannot map " + std::to_string(bytes >> 20) + " MB for weights (" + std::strerror(errno) + ")");
    uintptr_t at = reinterpret_cast<uintptr_t>(base), start = (at + kHugePage - 1) & ~(kHugePage - 1);
    if (start > at) munmap(base, start - at);
    if (at + mapped > start + length_) munmap(reinterpret_cast<void*>(start + length_), at + mapped - start - length_);
    start_ = reinterpret_cast<char*>(start);
    madvise(start_, length_, MADV_HUGEPAGE);
  }
  ~HostBlock() { munmap(start_, length_); }
  char* data() const { return start_; }
  void settle() const { madvise(start_, length_, 25 /* MADV_COLLAPSE, Linux 6.1+: best effort */); }

 private:
  size_t length_;
  char* start_;
};

size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Tensors over memory this program owns (it outlives every call): no copy, no free.
struct Borrowed {
  void AllocData(DLTensor* t, void* data) { t->data = data; }
  void FreeData(DLTensor*) {}
};
ffi::Tensor tensor_at(void* data, const std::vector<int64_t>& shape, const std::string& dtype) {
  return ffi::Tensor::FromNDAlloc(Borrowed(), ffi::ShapeView(shape.data(), shape.size()), dl_dtype(dtype),
                                  DLDevice{kDLCPU, 0}, data);
}

// Tensors over memory of their own, aligned as the kernels expect, freed with the last reference.
struct Owned {
  void AllocData(DLTensor* t) {
    t->data = std::aligned_alloc(kAlign, aligned(std::max<size_t>(ffi::GetDataSize(*t), 1)));
    if (!t->data) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};
ffi::Tensor empty_tensor(const std::vector<int64_t>& shape, DLDataType dtype) {
  return ffi::Tensor::FromNDAlloc(Owned(), ffi::ShapeView(shape.data(), shape.size()), dtype, DLDevice{kDLCPU, 0});
}
char* bytes_of(const ffi::Tensor& t) {
  const DLTensor* d = t.GetDLTensorPtr();
  return static_cast<char*>(d->data) + d->byte_offset;
}

// A safetensors header, checked as untrusted input (runtime/weight_files.py's tensors_of): each
// tensor the manifest names is there with its dtype and shape, inside the data section.
std::map<std::string, int64_t> tensor_offsets(const char* file, int64_t size, const std::vector<TensorSpec>& specs,
                                              const std::string& path) {
  static const std::map<std::string, std::string> stored = {{"F32", "float32"}, {"F16", "float16"}, {"BF16", "bfloat16"},
                                                            {"I8", "int8"},     {"U8", "uint8"},     {"I32", "int32"},
                                                            {"I64", "int64"}};
  uint64_t length = 0;
  if (size >= 8) std::memcpy(&length, file, 8);
  if (size < 8 || length < 2 || length > static_cast<uint64_t>(size - 8)) refuse(path + ": not a readable safetensors file");
  ffi::String error;
  Json parsed = ffi::json::Parse(ffi::String(file + 8, length), &error);
  auto header = parsed.try_cast<JsonObject>();
  if (!error.empty() || !header) refuse(path + ": not a readable safetensors file (its header)");
  int64_t start = 8 + static_cast<int64_t>(length);
  std::map<std::string, int64_t> offsets;
  for (const TensorSpec& spec : specs) {
    auto entry = header->find(ffi::String(spec.name));
    std::string got = "absent";
    if (entry != header->end()) {
      auto o = (*entry).second.try_cast<JsonObject>();
      if (o && has(*o, "dtype") && has(*o, "shape") && has(*o, "data_offsets")) {
        auto dtype = (*o).at(ffi::String("dtype")).try_cast<ffi::String>();
        auto it = dtype ? stored.find(std::string(*dtype)) : stored.end();
        std::vector<int64_t> shape;
        for (const Json& d : array((*o).at(ffi::String("shape")), "a shape")) shape.push_back(integer(d, "a dimension"));
        JsonArray range = array((*o).at(ffi::String("data_offsets")), "data_offsets");
        if (it != stored.end() && it->second == spec.dtype && shape == spec.shape && range.size() == 2) {
          int64_t first = integer(range[0], "an offset"), last = integer(range[1], "an offset");
          if (first < 0 || last - first != spec.bytes() || start + last > size)
            refuse(path + ": tensor " + spec.name + "'s bytes are not inside the file");
          offsets[spec.name] = start + first;
          continue;
        }
        got = it == stored.end() ? "of an unknown dtype" : it->second;
      }
    }
    refuse(path + ": tensor " + spec.name + " is " + got + ", expected " + spec.dtype);
  }
  return offsets;
}

// --- libraries: loaded from exactly the bytes hashed --------------------------------------------
// A library's two Relax VMs (tvm/runtime/vm.py's set-up) over one executable. `steady` takes the
// calls whose shapes repeat (a decode token, a prompt row through an MoE layer), with a pooled
// allocator: the pool keeps a buffer of every size it has seen. `prefill` takes the prompt's
// segment calls, whose intermediates scale with the prompt: allocated and freed each call, as
// runtime/model.py's naive VM does.
struct Library {
  ffi::Module steady, prefill;
};

Library load_library(const std::string& root, const FileRef& ref, const std::string& here) {
  VerifiedFile file(root, ref);
  std::string bytes(file.size(), '\0');
  file.read_into(bytes.data(), bytes.size());
  file.finish();
  if (bytes.size() >= 20 && bytes.compare(0, 4, "\x7f" "ELF") == 0) {
    uint16_t machine;
    std::memcpy(&machine, bytes.data() + 18, 2);
    const char* built = machine == 62 ? "x86-64" : machine == 183 ? "aarch64" : nullptr;
    if (built && here != built) refuse(ref.path + ": built for " + built + ", this machine is " + here);
  }
  // A sealed memory file the loader opens by a name with the library's suffix (it picks the
  // loader by suffix): a library swapped on disk after the check is never the one loaded.
  std::string base = ref.path.substr(ref.path.rfind('/') + 1);
  int fd = memfd_create(base.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) refuse(std::string("cannot create a memory file (") + std::strerror(errno) + ")");
  if (write(fd, bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size())) refuse("cannot write a memory file");
  fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
  char dir_template[] = "/tmp/moetvm-lib-XXXXXX";
  if (!mkdtemp(dir_template)) refuse("cannot create a private temporary directory");
  std::string link = std::string(dir_template) + "/" + base;
  if (symlink(("/proc/self/fd/" + std::to_string(fd)).c_str(), link.c_str())) refuse("cannot link the memory file");
  std::optional<ffi::Module> module;
  try {
    module = ffi::Module::LoadFromFile(link);
  } catch (const ffi::Error& e) {
    unlink(link.c_str()), rmdir(dir_template), close(fd);
    refuse(ref.path + ": not a loadable kernel library (" + e.message().substr(0, e.message().find('\n')) + ")");
  }
  unlink(link.c_str()), rmdir(dir_template), close(fd);  // the loader holds its own mapping
  auto load_executable = (*module)->GetFunction("vm_load_executable");
  if (!load_executable) refuse(ref.path + ": not a Relax VM library");
  auto vm = [&](int allocator) {
    ffi::Module made = (*load_executable)().cast<ffi::Module>();
    made->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, allocator);
    return made;
  };
  return {vm(kPooledAllocator), vm(kNaiveAllocator)};
}

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

// An input embedding table held by the slices its tokens reach (runtime/lookup_table.py): a token
// reads one row of an untied table, yet loaded whole it stays resident (OLMoE's is 206 MB at
// fp32). Its file was read and hashed whole at load, and each slice's SHA-256 kept; a slice is
// read again from the same descriptor when its first token comes, and used only if its digest
// matches. Small pages: a huge page would back 2 MB at the first row.
class LookupTable {
 public:
  LookupTable(const char* verified, const TensorSpec& spec, int fd, int64_t offset, const std::string& path)
      : spec_(spec), fd_(fd), offset_(offset), path_(path) {
    slices_ = spec.shape[0];
    slice_bytes_ = spec.bytes() / slices_;
    for (int64_t i = 0; i < slices_; ++i) digests_.push_back(digest(verified + i * slice_bytes_));
    filled_.assign(slices_, false);
    length_ = std::max<size_t>(1, spec.bytes());
    base_ = static_cast<char*>(mmap(nullptr, length_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base_ == MAP_FAILED) refuse("cannot map an embedding table");
    madvise(base_, length_, MADV_NOHUGEPAGE);
  }
  ~LookupTable() {
    munmap(base_, length_);
    close(fd_);
  }
  ffi::Tensor tensor() const { return tensor_at(base_, spec_.shape, spec_.dtype); }
  void fill_token(int64_t token) {
    int64_t i = std::min(std::max<int64_t>(token, 0) / spec_.lookup_rows, slices_ - 1);
    if (filled_[i]) return;
    char* at = base_ + i * slice_bytes_;
    if (pread(fd_, at, slice_bytes_, offset_ + i * slice_bytes_) != slice_bytes_ || digest(at) != digests_[i]) {
      std::memset(at, 0, slice_bytes_);
      refuse(path_ + ": changed since it was loaded (slice " + std::to_string(i) +
             " of an embedding table differs from the bytes verified then)");
    }
    filled_[i] = true;
  }

 private:
  std::string digest(const char* data) const {
    unsigned char out[32];
    unsigned int n = 0;
    EVP_Digest(data, slice_bytes_, out, &n, EVP_sha256(), nullptr);
    return std::string(reinterpret_cast<char*>(out), n);
  }
  TensorSpec spec_;
  int fd_;
  int64_t offset_;
  std::string path_;
  int64_t slices_ = 0, slice_bytes_ = 0;
  size_t length_ = 0;
  char* base_ = nullptr;
  std::vector<std::string> digests_;
  std::vector<bool> filled_;
};

struct Model {
  Manifest manifest;
  std::map<std::string, Library> libraries;
  std::vector<std::unique_ptr<HostBlock>> blocks;
  std::unordered_map<std::string, ffi::Tensor> weights;
  std::map<int64_t, ffi::Tensor> pools;
  std::vector<std::unique_ptr<LookupTable>> lookups;

  ffi::Function function(const std::string& library, const std::string& name, bool steady = true) {
    auto lib = libraries.find(library);
    if (lib == libraries.end()) refuse("manifest.json: no library named " + library);
    auto f = (steady ? lib->second.steady : lib->second.prefill)->GetFunction(name);
    if (!f) refuse(library + ": the library has no function '" + name + "' the manifest names");
    return *f;
  }
};

void load_dense(const std::string& root, Model& model) {
  for (const WeightFile& wf : model.manifest.weights) {
    VerifiedFile file(root, wf.file);
    std::string first = file.peek(8);
    uint64_t header = 0;
    if (first.size() == 8) std::memcpy(&header, first.data(), 8);
    size_t shift = (kAlign - (8 + header) % kAlign) % kAlign;  // the data section starts aligned
    model.blocks.push_back(std::make_unique<HostBlock>(wf.file.size + kAlign));
    char* data = model.blocks.back()->data() + shift;
    file.read_into(data, wf.file.size);
    file.finish();
    auto offsets = tensor_offsets(data, wf.file.size, wf.tensors, wf.file.path);
    model.blocks.back()->settle();
    for (const TensorSpec& spec : wf.tensors) {
      char* at = data + offsets[spec.name];
      if (spec.lookup_rows) {
        if (spec.shape[0] * spec.lookup_rows < model.manifest.vocab)
          refuse("manifest.json: tensor " + spec.name + ": its slices do not cover the vocabulary");
        model.lookups.push_back(std::make_unique<LookupTable>(at, spec, file.duplicate(), offsets[spec.name], wf.file.path));
        model.weights.emplace(spec.name, model.lookups.back()->tensor());
        // The table's bytes here go back to the system (small pages first, so that no huge page
        // comes back over them).
        uintptr_t page = sysconf(_SC_PAGESIZE), first = (reinterpret_cast<uintptr_t>(at) + page - 1) / page * page;
        uintptr_t last = (reinterpret_cast<uintptr_t>(at) + spec.bytes()) / page * page;
        if (last > first) {
          madvise(reinterpret_cast<void*>(first), last - first, MADV_NOHUGEPAGE);
          madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
        }
        continue;
      }
      if (reinterpret_cast<uintptr_t>(at) % kAlign)
        refuse(wf.file.path + ": tensor " + spec.name + " is not 64-byte aligned in its file");
      model.weights.emplace(spec.name, tensor_at(at, spec.shape, spec.dtype));
    }
  }
}

// Each resident layer's experts in one pool: expert e's tensors at e * slot_bytes + their slot
// offsets (artifact.Workload), what the resident and decode functions read.
void load_pools(const std::string& root, Model& model, const std::vector<int64_t>& layers) {
  size_t total = 0;
  for (int64_t index : layers) {
    const MoELayer& layer = model.manifest.moe_layers.at(index);
    total += layer.n_experts * model.manifest.workloads.at(layer.workload).slot_bytes + kAlign;
  }
  model.blocks.push_back(std::make_unique<HostBlock>(total));
  char* at = model.blocks.back()->data();
  std::vector<char> scratch;
  for (int64_t index : layers) {
    const MoELayer& layer = model.manifest.moe_layers.at(index);
    const Workload& w = model.manifest.workloads.at(layer.workload);
    if (w.slot_bytes % kAlign) refuse("manifest.json: MoE layer " + std::to_string(index) + ": its slots are not 64-byte multiples");
    for (size_t i = 0; i < w.params.size(); ++i) {
      bool placed = w.slot_offsets[i] >= 0 && w.slot_offsets[i] % kAlign == 0 && w.slot_offsets[i] + w.params[i].bytes() <= w.slot_bytes;
      if (!placed || (i && w.slot_offsets[i] < w.slot_offsets[i - 1] + w.params[i - 1].bytes()))
        refuse("manifest.json: MoE layer " + std::to_string(index) + ": its workload's slot layout overlaps or overflows");
    }
    model.pools.emplace(index, tensor_at(at, {layer.n_experts * w.slot_bytes}, "uint8"));
    for (int64_t e = 0; e < layer.n_experts; ++e) {
      const FileRef& ref = layer.experts[e];
      VerifiedFile file(root, ref);
      scratch.resize(ref.size);
      file.read_into(scratch.data(), ref.size);
      file.finish();
      auto offsets = tensor_offsets(scratch.data(), ref.size, w.params, ref.path);
      for (size_t i = 0; i < w.params.size(); ++i)
        std::memcpy(at + e * w.slot_bytes + w.slot_offsets[i], scratch.data() + offsets[w.params[i].name], w.params[i].bytes());
    }
    at += aligned(layer.n_experts * w.slot_bytes);
  }
  std::vector<char>().swap(scratch);
  model.blocks.back()->settle();
}

std::vector<ffi::Any> results_of(const ffi::Any& r) {
  if (auto a = r.try_cast<ffi::Array<ffi::Any>>()) return std::vector<ffi::Any>(a->begin(), a->end());
  return {r};
}

ffi::Any call(const ffi::Function& f, const std::vector<ffi::Any>& args, const std::string& what) {
  std::vector<ffi::AnyView> views(args.begin(), args.end());
  ffi::Any r;
  try {
    f.CallPacked(views.data(), static_cast<int32_t>(views.size()), &r);
  } catch (const ffi::Error& e) {
    refuse(what + ": the call failed (" + e.kind() + ": " + first_line(e.message()) + ")");
  }
  return r;
}

int64_t argmax(const ffi::Tensor& logits, int64_t vocab) {
  const DLTensor* t = logits.GetDLTensorPtr();
  int64_t n = 1;
  for (int i = 0; i < t->ndim; ++i) n *= t->shape[i];
  if (t->dtype.code != kDLFloat || t->dtype.bits != 32 || n < vocab) refuse("the logits are not float32 over the vocabulary");
  const float* row = reinterpret_cast<const float*>(static_cast<const char*>(t->data) + t->byte_offset) + (n - vocab);
  return std::max_element(row, row + vocab) - row;
}

double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  double at = q * (v.size() - 1);
  size_t lo = static_cast<size_t>(at);
  return lo + 1 < v.size() ? v[lo] + (v[lo + 1] - v[lo]) * (at - lo) : v[lo];
}

std::string machine() {
#if defined(__x86_64__)
  return "x86-64";
#elif defined(__aarch64__)
  return "aarch64";
#else
  return "unknown";
#endif
}

const char* kUsage =
    "usage: moetvm-run ARTIFACT --token-ids 1,2,3 [--max-new-tokens N] [--ignore-eos] [--threads N] [--json]\n"
    "Greedy decode of a moetvm artifact (every expert resident, one call a token), without Python.\n";

struct Options {
  std::string root, token_ids;
  int64_t max_new = 64;
  bool ignore_eos = false, as_json = false;
};

// The command line, or nullopt where it asked for --help or --version (printed here).
std::optional<Options> parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) refuse(a + " needs a value");
      return argv[++i];
    };
    auto positive = [&](const std::string& v) {
      char* end;
      long long n = std::strtoll(v.c_str(), &end, 10);
      if (v.empty() || *end || n < 1) refuse(a + " must be a positive integer, got '" + v + "'");
      return static_cast<int64_t>(n);
    };
    if (a == "--token-ids") o.token_ids = value();
    else if (a == "--max-new-tokens") o.max_new = positive(value());
    else if (a == "--threads") setenv("TVM_NUM_THREADS", std::to_string(positive(value())).c_str(), 1);  // read when TVM's pool starts
    else if (a == "--ignore-eos") o.ignore_eos = true;
    else if (a == "--json") o.as_json = true;
    else if (a == "--version") {
      std::printf("moetvm-run (artifact formats %lld-%lld)\n", static_cast<long long>(kMinFormat), static_cast<long long>(kMaxFormat));
      return std::nullopt;
    } else if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return std::nullopt;
    } else if (!a.empty() && a[0] == '-') refuse("unknown option " + a);
    else if (o.root.empty()) o.root = a;
    else refuse("one artifact directory, got a second: " + a);
  }
  if (o.root.empty() || o.token_ids.empty()) refuse("give an artifact directory and --token-ids (see --help)");
  struct stat info;
  if (stat(o.root.c_str(), &info) || !S_ISDIR(info.st_mode)) refuse(o.root + ": no such artifact directory");
  return o;
}

std::vector<int64_t> parse_token_ids(const std::string& text, int64_t vocab) {
  std::vector<int64_t> ids;
  std::stringstream items(text);
  for (std::string item; std::getline(items, item, ',');) {
    char* end;
    long long id = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end || id < 0 || id >= vocab)
      refuse("token id '" + item + "' is not in the vocabulary [0, " + std::to_string(vocab) + ")");
    ids.push_back(id);
  }
  return ids;
}

// A generation on the KV cache in place: the prompt in chunks through the per-segment program,
// then a token at a time through the one-call step. The steps' inputs (KV buffers, the token and
// its position, the cached positions), the one-call step's arguments and what the program drops
// after each step are made once.
class Decoder {
 public:
  // KV buffers for exactly the positions a generation writes, to the capacity multiple: each the
  // shape the manifest's input gives, batch 1, its symbolic dimension the capacity (in blocks
  // where the layout has them).
  Decoder(Model& model, const std::vector<int64_t>& moe_order, int64_t positions) : model_(model), m_(model.manifest) {
    capacity_ = (positions + m_.capacity_multiple - 1) / m_.capacity_multiple * m_.capacity_multiple;
    int64_t held = m_.block ? capacity_ / m_.block : capacity_;
    std::vector<TensorSpec> buffers;
    size_t bytes = 3 * kAlign + capacity_ * sizeof(int64_t);
    for (const TensorSpec& spec : m_.inputs)
      if (spec.name.rfind("key_buffer_", 0) == 0 || spec.name.rfind("value_buffer_", 0) == 0) {
        TensorSpec buffer = spec;
        if (buffer.shape.empty() || spec.dtype != m_.kv_dtype) refuse("manifest.json: KV buffer " + spec.name + " disagrees with the cache");
        buffer.shape[0] = 1;
        for (size_t i = 1; i < buffer.shape.size(); ++i) buffer.shape[i] = buffer.shape[i] < 0 ? held : buffer.shape[i];
        buffers.push_back(buffer);
        bytes += aligned(buffer.bytes());
      }
    block_ = std::make_unique<HostBlock>(bytes);  // read whole by every token at long contexts, as the weights are
    char* at = block_->data();
    for (const TensorSpec& buffer : buffers) {
      inputs_.emplace(buffer.name, tensor_at(at, buffer.shape, buffer.dtype));
      at += aligned(buffer.bytes());
    }
    token_ = reinterpret_cast<int64_t*>(at);
    position_ = reinterpret_cast<int64_t*>(at + kAlign);
    arange_ = reinterpret_cast<int64_t*>(at + 2 * kAlign);
    for (int64_t i = 0; i < capacity_; ++i) arange_[i] = i;
    inputs_.emplace("tokens", tensor_at(token_, {1, 1}, "int64"));
    inputs_.emplace("positions", tensor_at(position_, {1, 1}, "int64"));

    // The one-call step's arguments: its inputs (the cached positions set per token), the dense
    // weights, then each MoE layer's pool in program order.
    decode_step_ = model.function("segments", m_.decode_function);
    for (const std::string& name : m_.decode_inputs) {
      if (name == "past_positions") {
        past_at_.push_back(step_args_.size());
        step_args_.emplace_back(nullptr);
      } else if (inputs_.count(name)) step_args_.emplace_back(inputs_.at(name));
      else refuse("manifest.json: decode_step takes an input '" + name + "' moetvm-run does not know");
    }
    for (const std::string& name : m_.decode_weights) {
      if (!model.weights.count(name)) refuse("manifest.json: decode_step names a weight '" + name + "' no weight file holds");
      step_args_.emplace_back(model.weights.at(name));
    }
    for (int64_t layer : moe_order) step_args_.emplace_back(model.pools.at(layer));

    // For a prefill chunk (runtime/model.py's _dead_after and _head_segments): the values no later
    // step reads, dropped after their last step, so that a chunk holds one layer's intermediates
    // at a time; and the segments giving the model's outputs (the final norm, the LM head) that
    // run on the last position alone, since a prefill uses only its logits.
    std::unordered_map<std::string, size_t> last_use;
    for (size_t i = 0; i < m_.program.size(); ++i)
      for (const auto* names : {&m_.program[i].inputs, &m_.program[i].outputs})
        for (const std::string& name : *names) last_use[name] = i;
    dead_after_.resize(m_.program.size());
    for (const auto& [name, last] : last_use)
      if (!m_.outputs.count(name)) dead_after_[last].push_back(name);
    for (const Step& step : m_.program)
      on_last_position_.push_back(step.op == "segment" && step.per_position &&
                                  std::all_of(step.outputs.begin(), step.outputs.end(),
                                              [&](const std::string& o) { return m_.outputs.count(o) > 0; }));
  }

  int64_t capacity() const { return capacity_; }

  // The prompt, written into the KV cache; the logits whose last row is the first new token's.
  // Up to kPrefillChunk positions a call of each segment, through the per-segment program, whose
  // functions check every weight's and pool's shape (the one-call step does not:
  // artifact.DecodeStep). An MoE layer takes the chunk a row at a time through its one-token
  // function, which has the routing compiled in: grouping the rows by expert, as `moetvm run`
  // does, needs the routing on the host (moetvm/routing.py).
  ffi::Tensor prefill(const std::vector<int64_t>& prompt) {
    if (length_ != 0 || prompt.empty()) refuse("a prefill starts an empty cache with a prompt");
    ffi::Tensor logits;
    for (size_t start = 0; start < prompt.size(); start += kPrefillChunk) {
      size_t end = std::min(prompt.size(), start + kPrefillChunk);
      logits = ffi::Tensor();  // a chunk's logits go before the next's are made: only the last row is used
      logits = prefill_chunk(std::vector<int64_t>(prompt.begin() + start, prompt.begin() + end));
    }
    return logits;
  }

  // The logits of `token` at the next position, in one call of the decode step.
  ffi::Tensor step(int64_t token) {
    if (length_ == 0) refuse("a decode step follows a prefill");
    *token_ = token, *position_ = length_;
    for (auto& table : model_.lookups) table->fill_token(token);
    ffi::Tensor past = tensor_at(arange_, {1, length_}, "int64");
    for (size_t i : past_at_) step_args_[i] = past;
    ffi::Tensor logits = call(decode_step_, step_args_, "segments:" + m_.decode_function).cast<ffi::Tensor>();
    ++length_;
    return logits;
  }

 private:
  static const DLTensor& checked_tensor(const ffi::Any& value, const std::string& what) {
    auto t = value.as<ffi::Tensor>();
    if (!t) refuse(what + " is not a tensor");
    return *t->GetDLTensorPtr();
  }

  // Positions [length_, length_ + n) through the program.
  ffi::Tensor prefill_chunk(const std::vector<int64_t>& tokens) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    ffi::Tensor ids = empty_tensor({1, n}, DLDataType{kDLInt, 64, 1});
    std::copy(tokens.begin(), tokens.end(), reinterpret_cast<int64_t*>(bytes_of(ids)));
    for (int64_t token : tokens)
      for (auto& table : model_.lookups) table->fill_token(token);
    std::unordered_map<std::string, ffi::Any> env;
    for (const auto& [name, tensor] : model_.weights) env.emplace(name, tensor);
    for (const auto& [name, tensor] : inputs_) env.emplace(name, tensor);
    env["tokens"] = ids;
    env["positions"] = tensor_at(arange_ + length_, {1, n}, "int64");  // 8-byte steps: chunks start at multiples of 128
    env["past_positions"] = tensor_at(arange_, {1, length_}, "int64");
    for (size_t index = 0; index < m_.program.size(); ++index) {
      const Step& step = m_.program[index];
      std::vector<ffi::Any> args;
      for (const std::string& name : step.inputs) {
        auto it = env.find(name);
        if (it == env.end()) refuse("manifest.json: step " + step.name + " reads '" + name + "', which nothing gives");
        bool rows = on_last_position_[index] && !model_.weights.count(name);
        args.push_back(rows ? last_position(it->second, n, step.name) : it->second);
      }
      std::vector<ffi::Any> out;
      if (step.op == "segment") {
        out = results_of(call(model_.function("segments", step.name, n == 1), args, "segments:" + step.name));
        if (out.size() != step.outputs.size())
          refuse("segments:" + step.name + ": returns " + std::to_string(out.size()) + " values, the manifest names " +
                 std::to_string(step.outputs.size()));
      } else {
        out = {moe_rows(m_.moe_layers.at(step.layer), model_.pools.at(step.layer), args[0], n, step.name)};
      }
      for (size_t i = 0; i < step.outputs.size(); ++i) env[step.outputs[i]] = out[i];
      for (const std::string& name : dead_after_[index]) env.erase(name);  // a weight or KV buffer lives on in the model
    }
    length_ += n;
    auto logits = env.count("logits") ? env.at("logits").try_cast<ffi::Tensor>() : std::nullopt;
    if (!logits) refuse("the program gives no logits tensor");
    return *logits;
  }

  // (1, n, ...) -> its last position's (1, 1, ...), copied to aligned memory.
  static ffi::Tensor last_position(const ffi::Any& value, int64_t n, const std::string& step) {
    const DLTensor& t = checked_tensor(value, step + "'s input");
    if (t.ndim < 2 || t.shape[0] != 1 || t.shape[1] != n) refuse(step + ": its input is not the chunk's (1, n, ...) rows");
    int64_t row = t.dtype.bits / 8;
    std::vector<int64_t> shape(t.shape, t.shape + t.ndim);
    for (size_t i = 2; i < shape.size(); ++i) row *= shape[i];
    shape[1] = 1;
    ffi::Tensor copy = empty_tensor(shape, t.dtype);
    std::memcpy(bytes_of(copy), static_cast<const char*>(t.data) + t.byte_offset + (n - 1) * row, row);
    return copy;
  }

  // An MoE layer on the chunk's (1, n, d) hidden states, a row at a time: router and layer in one
  // call where the artifact has the decode function, else the router's scores, then the
  // resident function on a (1, d) row.
  ffi::Tensor moe_rows(const MoELayer& layer, const ffi::Tensor& pool, const ffi::Any& value, int64_t n,
                       const std::string& step) {
    const DLTensor& x = checked_tensor(value, step + "'s input");
    if (x.ndim != 3 || x.shape[0] != 1 || x.shape[1] != n || x.shape[2] != layer.d_model)
      refuse(step + ": its input is not the chunk's (1, n, " + std::to_string(layer.d_model) + ") hidden states");
    const std::string dtype = ffi::DLDataTypeToString(x.dtype);
    const int64_t row_bytes = layer.d_model * x.dtype.bits / 8;
    const char* rows = static_cast<const char*>(x.data) + x.byte_offset;
    ffi::Tensor y = empty_tensor({1, n, layer.d_model}, x.dtype), row = empty_tensor({1, 1, layer.d_model}, x.dtype);
    for (int64_t t = 0; t < n; ++t) {
      std::memcpy(bytes_of(row), rows + t * row_bytes, row_bytes);  // aligned, whatever d is
      ffi::Any out;
      if (!layer.decode_function.empty()) {
        out = call(model_.function(layer.router_library, layer.decode_function), {row, pool},
                   layer.decode_function);
      } else {
        ffi::Tensor flat = tensor_at(bytes_of(row), {1, layer.d_model}, dtype);
        ffi::Any scores = call(model_.function(layer.router_library, layer.router_function), {flat}, layer.router_function);
        const std::string& library = m_.workloads.at(layer.workload).library;
        out = call(model_.function(library, layer.resident_function), {flat, scores, pool}, layer.resident_function);
      }
      const DLTensor& o = checked_tensor(out, layer.decode_function.empty() ? layer.resident_function : layer.decode_function);
      int64_t elements = 1;
      for (int i = 0; i < o.ndim; ++i) elements *= o.shape[i];
      if (elements != layer.d_model || o.dtype.code != x.dtype.code || o.dtype.bits != x.dtype.bits)
        refuse(step + ": the layer did not return one row of the hidden states");
      std::memcpy(bytes_of(y) + t * row_bytes, static_cast<const char*>(o.data) + o.byte_offset, row_bytes);
    }
    return y;
  }

  Model& model_;
  const Manifest& m_;
  int64_t capacity_ = 0, length_ = 0;
  std::unique_ptr<HostBlock> block_;
  std::unordered_map<std::string, ffi::Tensor> inputs_;
  int64_t *token_ = nullptr, *position_ = nullptr, *arange_ = nullptr;
  ffi::Function decode_step_;
  std::vector<ffi::Any> step_args_;
  std::vector<size_t> past_at_;
  std::vector<std::vector<std::string>> dead_after_;
  std::vector<bool> on_last_position_;
};

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int run(const Options& options) {
  double t_start = now_ms();
  Model model;
  model.manifest = read_manifest(options.root);
  const Manifest& m = model.manifest;
  std::vector<int64_t> prompt = parse_token_ids(options.token_ids, m.vocab);
  int64_t positions = static_cast<int64_t>(prompt.size()) + options.max_new;
  if (m.max_positions && positions > m.max_positions)
    refuse("sequence of " + std::to_string(positions) + " tokens exceeds the model's " + std::to_string(m.max_positions) + " positions");

  for (const auto& [name, ref] : m.libraries) model.libraries.emplace(name, load_library(options.root, ref, machine()));
  load_dense(options.root, model);
  std::vector<int64_t> moe_order;
  for (const Step& step : m.program)
    if (step.op == "moe") {
      if (!m.moe_layers.count(step.layer)) refuse("manifest.json: step " + step.name + " names no MoE layer");
      moe_order.push_back(step.layer);
    }
  load_pools(options.root, model, moe_order);
  Decoder decoder(model, moe_order, positions);
  malloc_trim(0);  // what loading freed (the manifest's parse, read buffers) back to the system
  double loaded_ms = now_ms() - t_start;

  // The prompt, then each new token fed back.
  std::vector<int64_t> generated;
  std::vector<double> latencies;
  std::string finish = "length";
  int64_t next = argmax(decoder.prefill(prompt), m.vocab);
  double prefill_ms = now_ms() - t_start - loaded_ms;
  while (true) {
    generated.push_back(next);
    if (!options.as_json) std::printf("%lld,", static_cast<long long>(next)), std::fflush(stdout);
    if (!options.ignore_eos && std::find(m.eos.begin(), m.eos.end(), next) != m.eos.end()) {
      finish = "eos";
      break;
    }
    if (static_cast<int64_t>(generated.size()) == options.max_new) break;
    double t0 = now_ms();
    next = argmax(decoder.step(next), m.vocab);
    latencies.push_back(now_ms() - t0);
  }

  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  if (!options.as_json) {
    std::printf("\n");
    std::fprintf(stderr, "prefill %.1f ms (%zu tokens), decode p50 %.2f ms a token, load %.0f ms, peak RSS %.0f MB\n",
                 prefill_ms, prompt.size(), percentile(latencies, 0.5), loaded_ms, usage.ru_maxrss / 1024.0);
    return 0;
  }
  std::ostringstream json;
  json << "{\"engine\": \"moetvm-run\", \"prompt_tokens\": " << prompt.size() << ", \"new_ids\": [";
  for (size_t i = 0; i < generated.size(); ++i) json << (i ? ", " : "") << generated[i];
  json << "], \"finish_reason\": \"" << finish << "\", \"decode_tokens\": " << latencies.size()
       << ", \"latency_ms\": {\"p50\": " << percentile(latencies, 0.5) << ", \"p95\": " << percentile(latencies, 0.95)
       << ", \"p99\": " << percentile(latencies, 0.99) << "}, \"prefill_ms\": [" << prefill_ms << "], \"load_ms\": " << loaded_ms
       << ", \"kv_capacity\": " << decoder.capacity() << ", \"peak_rss_mb\": " << usage.ru_maxrss / 1024.0 << "}";
  std::printf("%s\n", json.str().c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    std::optional<Options> options = parse_options(argc, argv);
    return options ? run(*options) : 0;
  } catch (const Refusal& e) {
    std::fprintf(stderr, "moetvm-run: error: %s\n", e.what());
  } catch (const ffi::Error& e) {
    std::fprintf(stderr, "moetvm-run: error: %s: %s\n", e.kind().c_str(), first_line(e.message()).c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moetvm-run: error: %s\n", e.what());
  }
  return 2;
}
