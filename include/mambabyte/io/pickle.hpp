/*! \file
 *  \brief A restricted pickle virtual machine: exactly the opcode subset (protocols 2-5) and
 *         the few globals that torch.save() uses for a state dict. It never executes code:
 *         the only "callables" are OrderedDict, torch._utils._rebuild_tensor_v2 /
 *         _rebuild_parameter and the torch.*Storage types, interpreted here. Any other global,
 *         an unknown opcode, stack underflow, a bad memo index or truncated data throws
 *         mambabyte::Error naming the context (file), the offset and the opcode.
 *
 *  The machine is iterative (no recursion), and all objects live in an arena owned by the
 *  Unpickler: values are cheap handles, reference cycles cannot leak, and the total number of
 *  values is capped, so hostile input can neither overflow the C++ stack nor blow up memory
 *  beyond a small multiple of its own size.
 */
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "mambabyte/core/dtype.hpp"
#include "mambabyte/core/error.hpp"

namespace mambabyte::io::pickle {

struct Tuple;
struct List;
struct Dict;
struct Global;
struct StorageRef;
struct Tensor;

/// Python None.
struct None {
  bool operator==(None const&) const = default;
};

/// A pickled value: a scalar, or a handle to an object owned by the Unpickler's arena.
/// Copying a Value copies the handle (Python reference semantics).
struct Value {
  std::variant<None, bool, std::int64_t, double, std::string const*, Tuple const*, List*, Dict*,
               Global const*, StorageRef const*, Tensor const*>
      v;

  template <class T>
  bool is() const noexcept {
    return std::holds_alternative<T>(v);
  }
  /// The alternative T, or a null pointer / nullptr-like default when it holds something else.
  template <class T>
  T const* get_if() const noexcept {
    return std::get_if<T>(&v);
  }
  std::string const* string() const noexcept {
    auto p = std::get_if<std::string const*>(&v);
    return p ? *p : nullptr;
  }
  Tuple const* tuple() const noexcept {
    auto p = std::get_if<Tuple const*>(&v);
    return p ? *p : nullptr;
  }
  List* list() const noexcept {
    auto p = std::get_if<List*>(&v);
    return p ? *p : nullptr;
  }
  Dict* dict() const noexcept {
    auto p = std::get_if<Dict*>(&v);
    return p ? *p : nullptr;
  }
  Global const* global() const noexcept {
    auto p = std::get_if<Global const*>(&v);
    return p ? *p : nullptr;
  }
  StorageRef const* storage() const noexcept {
    auto p = std::get_if<StorageRef const*>(&v);
    return p ? *p : nullptr;
  }
  Tensor const* tensor() const noexcept {
    auto p = std::get_if<Tensor const*>(&v);
    return p ? *p : nullptr;
  }
  /// Python-ish type name for messages.
  char const* kind_name() const noexcept {
    static constexpr char const* names[] = {"None", "bool", "int",    "float",   "str",   "tuple",
                                            "list", "dict", "global", "storage", "tensor"};
    return names[v.index()];
  }
};

struct Tuple {
  std::vector<Value> items;
};
struct List {
  std::vector<Value> items;
};

/// A dict (plain or OrderedDict) with str or int keys, in insertion order. Setting an
/// existing key replaces its value in place, as in Python.
struct Dict {
  std::vector<std::pair<Value, Value>> items;
  std::unordered_map<std::string, std::size_t> str_index;
  std::unordered_map<std::int64_t, std::size_t> int_index;

  Value const* find(std::string const& key) const {
    auto it = str_index.find(key);
    return it == str_index.end() ? nullptr : &items[it->second].second;
  }
  Value const* find(std::int64_t key) const {
    auto it = int_index.find(key);
    return it == int_index.end() ? nullptr : &items[it->second].second;
  }
};

/// The globals a torch state dict may reference.
enum class GlobalKind : std::uint8_t {
  kOrderedDict,       ///< collections.OrderedDict
  kRebuildTensorV2,   ///< torch._utils._rebuild_tensor_v2
  kRebuildParameter,  ///< torch._utils._rebuild_parameter
  kStorageType,       ///< torch.FloatStorage and friends (dtype says which)
};

struct Global {
  GlobalKind kind;
  DType dtype = DType::kF32;  ///< for kStorageType
  std::string qualified;      ///< "module.name"
};

/// A persistent id ('storage', StorageType, key, location, numel): a typed storage kept
/// outside the pickle (in a torch zip: the entry <archive>/data/<key>).
struct StorageRef {
  DType dtype;
  std::string key;
  std::string location;
  std::int64_t numel;  ///< in elements of dtype
};

/// A tensor view of a storage as given to _rebuild_tensor_v2 (validated only for types and
/// signs here; bounds are checked against the real storage by the loader).
struct Tensor {
  StorageRef const* storage;
  std::int64_t storage_offset;
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> stride;
  bool requires_grad = false;
  bool parameter = false;  ///< came through _rebuild_parameter
};

/// Resource caps for untrusted input.
struct Limits {
  std::size_t max_values = std::size_t{1} << 24;  ///< objects created + container insertions
  std::size_t max_ndim = 64;                      ///< tensor rank
};

/// Map an allowed (module, name) to its Global description; throws naming "module.name"
/// otherwise. `where` prefixes the message.
inline Global resolve_global(std::string_view module, std::string_view name,
                             std::string const& where) {
  std::string const q = std::string(module) + "." + std::string(name);
  if (q == "collections.OrderedDict") return {GlobalKind::kOrderedDict, DType::kF32, q};
  if (q == "torch._utils._rebuild_tensor_v2") return {GlobalKind::kRebuildTensorV2, DType::kF32, q};
  if (q == "torch._utils._rebuild_parameter")
    return {GlobalKind::kRebuildParameter, DType::kF32, q};
  if (module == "torch") {
    static constexpr std::pair<std::string_view, DType> storages[] = {
        {"FloatStorage", DType::kF32}, {"DoubleStorage", DType::kF64},
        {"HalfStorage", DType::kF16},  {"BFloat16Storage", DType::kBF16},
        {"LongStorage", DType::kI64},  {"IntStorage", DType::kI32},
        {"ShortStorage", DType::kI16}, {"CharStorage", DType::kI8},
        {"ByteStorage", DType::kU8},   {"BoolStorage", DType::kBool}};
    for (auto const& [n, d] : storages)
      if (n == name) return {GlobalKind::kStorageType, d, q};
  }
  fail(where, "forbidden global '", q,
       "': only collections.OrderedDict, torch._utils._rebuild_tensor_v2, "
       "torch._utils._rebuild_parameter and torch.<Type>Storage may appear in a checkpoint");
}

/// Runs a pickle program to its STOP on construction; root() is the unpickled object. All
/// values reachable from it live as long as the Unpickler (neither copyable nor movable).
class Unpickler {
 public:
  /// `context` names the source in messages, e.g. "model.pt:archive/data.pkl".
  Unpickler(std::span<const std::byte> data, std::string context, Limits limits = {})
      : data_(data), context_(std::move(context)), limits_(limits) {
    run();
  }
  Unpickler(Unpickler const&) = delete;
  Unpickler& operator=(Unpickler const&) = delete;

  Value const& root() const noexcept { return root_; }
  std::string const& context() const noexcept { return context_; }
  /// Highest PROTO seen (0 if none).
  int protocol() const noexcept { return protocol_; }

 private:
  // ---- errors -------------------------------------------------------------------------------
  std::string where() const { return mambabyte::detail::concat("pickle '", context_, "': "); }
  static std::string hex(unsigned op) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "0x%02x", op & 0xffu);
    return buf;
  }
  template <class... A>
  [[noreturn]] void bad(A&&... a) const {
    fail("pickle '", context_, "': opcode ", hex(op_), " at offset ", op_pos_, ": ",
         std::forward<A>(a)...);
  }

  // ---- input --------------------------------------------------------------------------------
  std::span<const std::byte> take(std::uint64_t n) {
    std::size_t const left = data_.size() - pos_;
    if (n > left) bad("truncated data: needs ", n, " more bytes, only ", left, " left");
    auto s = data_.subspan(pos_, static_cast<std::size_t>(n));
    pos_ += static_cast<std::size_t>(n);
    return s;
  }
  std::uint64_t le(std::size_t n) {
    auto s = take(n);
    std::uint64_t v = 0;
    for (std::size_t i = 0; i < n; ++i) v |= static_cast<std::uint64_t>(s[i]) << (8 * i);
    return v;
  }
  std::string_view line() {
    std::size_t const left = data_.size() - pos_;
    auto const* start = reinterpret_cast<char const*>(data_.data() + pos_);
    void const* nl = left ? std::memchr(start, '\n', left) : nullptr;
    if (nl == nullptr) bad("truncated data: newline-terminated argument not found");
    std::size_t const len = static_cast<std::size_t>(static_cast<char const*>(nl) - start);
    pos_ += len + 1;
    return {start, len};
  }

  // ---- arena --------------------------------------------------------------------------------
  void charge(std::size_t n = 1) {
    values_ += n;
    if (values_ > limits_.max_values)
      bad("the pickle creates more than ", limits_.max_values,
          " values (resource limit for untrusted input)");
  }
  Value new_string(std::span<const std::byte> s) {
    charge();
    strings_.emplace_back(reinterpret_cast<char const*>(s.data()), s.size());
    return Value{static_cast<std::string const*>(&strings_.back())};
  }
  Value new_tuple(std::vector<Value> items) {
    charge(1 + items.size());
    tuples_.push_back(Tuple{std::move(items)});
    return Value{static_cast<Tuple const*>(&tuples_.back())};
  }
  Value new_list() {
    charge();
    lists_.emplace_back();
    return Value{static_cast<List*>(&lists_.back())};
  }
  Value new_dict() {
    charge();
    dicts_.emplace_back();
    return Value{static_cast<Dict*>(&dicts_.back())};
  }
  void dict_set(Dict& d, Value const& k, Value const& val) {
    charge();
    if (auto s = k.string()) {
      auto [it, fresh] = d.str_index.emplace(*s, d.items.size());
      if (fresh)
        d.items.emplace_back(k, val);
      else
        d.items[it->second].second = val;
    } else if (auto i = k.get_if<std::int64_t>()) {
      auto [it, fresh] = d.int_index.emplace(*i, d.items.size());
      if (fresh)
        d.items.emplace_back(k, val);
      else
        d.items[it->second].second = val;
    } else {
      bad("unsupported dict key of type ", k.kind_name(), " (only str and int keys)");
    }
  }

  // ---- stack --------------------------------------------------------------------------------
  std::size_t frame_base() const noexcept { return marks_.empty() ? 0 : marks_.back(); }
  std::size_t available() const noexcept { return stack_.size() - frame_base(); }
  void push(Value v) {
    charge();
    stack_.push_back(std::move(v));
  }
  Value pop() {
    if (available() == 0) bad("stack underflow");
    Value v = std::move(stack_.back());
    stack_.pop_back();
    return v;
  }
  Value& top() {
    if (available() == 0) bad("stack underflow");
    return stack_.back();
  }
  std::vector<Value> pop_mark() {
    if (marks_.empty()) bad("no MARK on the stack");
    std::size_t const m = marks_.back();
    marks_.pop_back();
    std::vector<Value> items(
        std::make_move_iterator(stack_.begin() + static_cast<std::ptrdiff_t>(m)),
        std::make_move_iterator(stack_.end()));
    stack_.resize(m);
    return items;
  }
  std::vector<Value> pop_n(std::size_t n) {
    if (available() < n) bad("stack underflow");
    std::vector<Value> items(std::make_move_iterator(stack_.end() - static_cast<std::ptrdiff_t>(n)),
                             std::make_move_iterator(stack_.end()));
    stack_.resize(stack_.size() - n);
    return items;
  }
  void memo_put(std::uint64_t index) {
    Value const& v = top();
    charge();
    memo_[index] = v;
  }
  Value memo_get(std::uint64_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) bad("memo index ", index, " is not defined");
    return it->second;
  }

  // ---- the "callables" ------------------------------------------------------------------------
  std::vector<std::int64_t> int_tuple(Value const& v, char const* what) {
    Tuple const* t = v.tuple();
    if (t == nullptr) bad(what, " must be a tuple of ints, got ", v.kind_name());
    if (t->items.size() > limits_.max_ndim)
      bad(what, " has ", t->items.size(), " dims (limit ", limits_.max_ndim, ")");
    std::vector<std::int64_t> out;
    out.reserve(t->items.size());
    for (Value const& x : t->items) {
      auto i = x.get_if<std::int64_t>();
      if (i == nullptr) bad(what, " must be a tuple of ints, has a ", x.kind_name());
      if (*i < 0) bad(what, " has a negative entry ", *i);
      out.push_back(*i);
    }
    return out;
  }

  Value call(Global const& g, Tuple const& args) {
    switch (g.kind) {
      case GlobalKind::kOrderedDict: {
        Value d = new_dict();
        if (args.items.empty()) return d;
        if (args.items.size() != 1) bad("OrderedDict() takes at most 1 argument");
        std::vector<Value> const* pairs = nullptr;
        if (auto l = args.items[0].list()) pairs = &l->items;
        if (auto t = args.items[0].tuple()) pairs = &t->items;
        if (pairs == nullptr)
          bad("OrderedDict() argument must be a list of pairs, got ", args.items[0].kind_name());
        for (Value const& p : *pairs) {
          Tuple const* kv = p.tuple();
          if (kv == nullptr || kv->items.size() != 2)
            bad("OrderedDict() argument must be a list of (key, value) pairs");
          dict_set(*d.dict(), kv->items[0], kv->items[1]);
        }
        return d;
      }
      case GlobalKind::kRebuildTensorV2: {
        auto const& a = args.items;
        if (a.size() != 6 && a.size() != 7)
          bad(g.qualified, "() takes 6 or 7 arguments, got ", a.size());
        StorageRef const* s = a[0].storage();
        if (s == nullptr)
          bad(g.qualified, "(): argument 1 must be a storage, got ", a[0].kind_name());
        auto off = a[1].get_if<std::int64_t>();
        if (off == nullptr || *off < 0)
          bad(g.qualified, "(): storage_offset must be a non-negative int");
        Tensor t{s,     *off, int_tuple(a[2], "tensor size"), int_tuple(a[3], "tensor stride"),
                 false, false};
        if (t.shape.size() != t.stride.size())
          bad(g.qualified, "(): size has ", t.shape.size(), " dims but stride has ",
              t.stride.size());
        if (auto rg = a[4].get_if<bool>()) t.requires_grad = *rg;
        charge(1 + t.shape.size());
        tensors_.push_back(std::move(t));
        return Value{static_cast<Tensor const*>(&tensors_.back())};
      }
      case GlobalKind::kRebuildParameter: {
        auto const& a = args.items;
        if (a.size() != 3) bad(g.qualified, "() takes 3 arguments, got ", a.size());
        Tensor const* t = a[0].tensor();
        if (t == nullptr)
          bad(g.qualified, "(): argument 1 must be a tensor, got ", a[0].kind_name());
        Tensor p = *t;
        p.parameter = true;
        if (auto rg = a[1].get_if<bool>()) p.requires_grad = *rg;
        charge(1 + p.shape.size());
        tensors_.push_back(std::move(p));
        return Value{static_cast<Tensor const*>(&tensors_.back())};
      }
      case GlobalKind::kStorageType:
        break;
    }
    bad("'", g.qualified, "' cannot be called");
  }

  Value persistent_load(Value const& pid) {
    Tuple const* t = pid.tuple();
    if (t == nullptr || t->items.size() != 5)
      bad("unsupported persistent id (expected a 5-tuple ('storage', StorageType, key, "
          "location, numel), got a ",
          pid.kind_name(), ")");
    auto const& a = t->items;
    std::string const* tag = a[0].string();
    if (tag == nullptr || *tag != "storage") bad("persistent id does not start with 'storage'");
    Global const* g = a[1].global();
    if (g == nullptr || g->kind != GlobalKind::kStorageType)
      bad("persistent id has no torch storage type");
    std::string const* key = a[2].string();
    std::string const* loc = a[3].string();
    auto numel = a[4].get_if<std::int64_t>();
    if (key == nullptr || loc == nullptr || numel == nullptr || *numel < 0)
      bad("persistent id ('storage', ", g->qualified,
          ", ...) needs a str key, a str location and a non-negative int numel");
    charge();
    storages_.push_back(StorageRef{g->dtype, *key, *loc, *numel});
    return Value{static_cast<StorageRef const*>(&storages_.back())};
  }

  // ---- the machine ----------------------------------------------------------------------------
  void run() {
    for (;;) {
      op_pos_ = pos_;
      if (pos_ >= data_.size())
        fail(where(), "truncated data: no STOP opcode before offset ", pos_);
      op_ = static_cast<unsigned>(data_[pos_++]);
      switch (op_) {
        case 0x80: {  // PROTO
          auto const p = le(1);
          if (p > 5) bad("unsupported pickle protocol ", p);
          protocol_ = static_cast<int>(p);
          break;
        }
        case 0x95: {  // FRAME: a length prefix only; opcodes continue inside
          auto const n = le(8);
          if (n > data_.size() - pos_)
            bad("frame of ", n, " bytes exceeds the ", data_.size() - pos_, " bytes left");
          break;
        }
        case '.': {  // STOP
          if (!marks_.empty()) bad("STOP with an open MARK");
          if (stack_.size() != 1)
            bad("STOP with ", stack_.size(), " values on the stack (expected 1)");
          root_ = stack_.back();
          return;
        }
        case '(':  // MARK
          charge();
          marks_.push_back(stack_.size());
          break;
        case '0':  // POP
          if (available() > 0)
            stack_.pop_back();
          else if (!marks_.empty())
            marks_.pop_back();
          else
            bad("stack underflow");
          break;
        case '1':
          (void)pop_mark();
          break;  // POP_MARK
        case '2':
          push(top());
          break;  // DUP
        case 'N':
          push(Value{None{}});
          break;
        case 0x88:
          push(Value{true});
          break;  // NEWTRUE
        case 0x89:
          push(Value{false});
          break;     // NEWFALSE
        case 'J': {  // BININT
          auto const u = static_cast<std::uint32_t>(le(4));
          std::int32_t s;
          std::memcpy(&s, &u, 4);
          push(Value{static_cast<std::int64_t>(s)});
          break;
        }
        case 'K':
          push(Value{static_cast<std::int64_t>(le(1))});
          break;  // BININT1
        case 'M':
          push(Value{static_cast<std::int64_t>(le(2))});
          break;      // BININT2
        case 0x8a: {  // LONG1
          auto const n = static_cast<std::size_t>(le(1));
          auto const bytes = take(n);
          std::uint64_t u = 0;
          for (std::size_t i = 0; i < n && i < 8; ++i)
            u |= static_cast<std::uint64_t>(bytes[i]) << (8 * i);
          if (n > 8) {  // fits only if the extra bytes are pure sign extension
            auto const ext = (u >> 63) ? std::byte{0xff} : std::byte{0};
            for (std::size_t i = 8; i < n; ++i)
              if (bytes[i] != ext) bad("LONG1 integer of ", n, " bytes does not fit in 64 bits");
          }
          if (n > 0 && n < 8 && (u >> (8 * n - 1)) & 1u) u |= ~std::uint64_t{0} << (8 * n);
          std::int64_t s;
          std::memcpy(&s, &u, 8);
          push(Value{s});
          break;
        }
        case 'G': {  // BINFLOAT (big-endian)
          auto s = take(8);
          std::uint64_t u = 0;
          for (int i = 0; i < 8; ++i) u = (u << 8) | static_cast<std::uint64_t>(s[i]);
          double d;
          std::memcpy(&d, &u, 8);
          push(Value{d});
          break;
        }
        case 0x8c:
        case 'U':
        case 'C':  // SHORT_BINUNICODE, SHORT_BINSTRING, SHORT_BINBYTES
          push(new_string(take(le(1))));
          break;
        case 'X':
        case 'B':  // BINUNICODE, BINBYTES
          push(new_string(take(le(4))));
          break;
        case 'T': {  // BINSTRING (signed length)
          auto const u = static_cast<std::uint32_t>(le(4));
          if (u & 0x80000000u) bad("negative BINSTRING length");
          push(new_string(take(u)));
          break;
        }
        case 0x8d:
        case 0x8e:  // BINUNICODE8, BINBYTES8
          push(new_string(take(le(8))));
          break;
        case '}':
          push(new_dict());
          break;  // EMPTY_DICT
        case ']':
          push(new_list());
          break;  // EMPTY_LIST
        case ')':
          push(new_tuple({}));
          break;  // EMPTY_TUPLE
        case 't':
          push(new_tuple(pop_mark()));
          break;  // TUPLE
        case 0x85:
          push(new_tuple(pop_n(1)));
          break;  // TUPLE1
        case 0x86:
          push(new_tuple(pop_n(2)));
          break;  // TUPLE2
        case 0x87:
          push(new_tuple(pop_n(3)));
          break;     // TUPLE3
        case 'a': {  // APPEND
          Value v = pop();
          List* l = top().list();
          if (l == nullptr) bad("APPEND to a ", top().kind_name(), ", not a list");
          charge();
          l->items.push_back(std::move(v));
          break;
        }
        case 'e': {  // APPENDS
          std::vector<Value> items = pop_mark();
          List* l = top().list();
          if (l == nullptr) bad("APPENDS to a ", top().kind_name(), ", not a list");
          charge(items.size());
          for (Value& v : items) l->items.push_back(std::move(v));
          break;
        }
        case 's': {  // SETITEM
          Value v = pop();
          Value k = pop();
          Dict* d = top().dict();
          if (d == nullptr) bad("SETITEM on a ", top().kind_name(), ", not a dict");
          dict_set(*d, k, v);
          break;
        }
        case 'u': {  // SETITEMS
          std::vector<Value> items = pop_mark();
          if (items.size() % 2) bad("SETITEMS with an odd number (", items.size(), ") of values");
          Dict* d = top().dict();
          if (d == nullptr) bad("SETITEMS on a ", top().kind_name(), ", not a dict");
          for (std::size_t i = 0; i < items.size(); i += 2) dict_set(*d, items[i], items[i + 1]);
          break;
        }
        case 'q':
          memo_put(le(1));
          break;  // BINPUT
        case 'r':
          memo_put(le(4));
          break;  // LONG_BINPUT
        case 0x94:
          memo_put(memo_.size());
          break;  // MEMOIZE
        case 'h':
          push(memo_get(le(1)));
          break;  // BINGET
        case 'j':
          push(memo_get(le(4)));
          break;     // LONG_BINGET
        case 'c': {  // GLOBAL "module\nname\n"
          std::string_view const module = line();
          std::string_view const name = line();
          push(new_global(module, name));
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          Value name = pop();
          Value module = pop();
          if (!name.string() || !module.string()) bad("STACK_GLOBAL needs two str values");
          push(new_global(*module.string(), *name.string()));
          break;
        }
        case 'R': {  // REDUCE
          Value args = pop();
          Value fn = pop();
          Global const* g = fn.global();
          if (g == nullptr) bad("REDUCE on a ", fn.kind_name(), ", not a global");
          Tuple const* t = args.tuple();
          if (t == nullptr) bad("REDUCE arguments to '", g->qualified, "' are not a tuple");
          push(call(*g, *t));
          break;
        }
        case 0x81: {  // NEWOBJ cls.__new__(cls, *args)
          Value args = pop();
          Value cls = pop();
          Global const* g = cls.global();
          if (g == nullptr || g->kind != GlobalKind::kOrderedDict)
            bad("NEWOBJ is only supported for collections.OrderedDict");
          Tuple const* t = args.tuple();
          if (t == nullptr || !t->items.empty()) bad("NEWOBJ arguments must be an empty tuple");
          push(new_dict());
          break;
        }
        case 'b': {  // BUILD: only attribute state on a dict (OrderedDict._metadata), ignored
          Value state = pop();
          Value& obj = top();
          if (obj.dict() == nullptr) bad("BUILD on a ", obj.kind_name(), " is not supported");
          if (!state.dict() && !state.is<None>() && !state.tuple())
            bad("BUILD state must be a dict, a tuple or None, got ", state.kind_name());
          break;
        }
        case 'Q':
          push(persistent_load(pop()));
          break;  // BINPERSID
        default:
          bad("unknown or unsupported pickle opcode ", hex(op_));
      }
    }
  }

  Value new_global(std::string_view module, std::string_view name) {
    std::string const w =
        mambabyte::detail::concat(where(), "opcode ", hex(op_), " at offset ", op_pos_, ": ");
    Global g = resolve_global(module, name, w);
    charge();
    globals_.push_back(std::move(g));
    return Value{static_cast<Global const*>(&globals_.back())};
  }

  std::span<const std::byte> data_;
  std::string context_;
  Limits limits_;
  std::size_t pos_ = 0, op_pos_ = 0;
  unsigned op_ = 0;
  int protocol_ = 0;
  std::size_t values_ = 0;
  std::vector<Value> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint64_t, Value> memo_;
  std::deque<std::string> strings_;
  std::deque<Tuple> tuples_;
  std::deque<List> lists_;
  std::deque<Dict> dicts_;
  std::deque<Global> globals_;
  std::deque<StorageRef> storages_;
  std::deque<Tensor> tensors_;
  Value root_;
};

}  // namespace mambabyte::io::pickle
