/* Compiled chunk scanner for `tts-exporter analyze` (module exporter.analyze._scan), and
 * the live pipeline's line classifier (Classifier, at the end), which reads lines with the
 * same recogniser (parse_text, parse_pairs over a Names table).
 *
 * Why C: Python's regex engine and interpreter cost several times the reading of the files
 * per byte of log; this walks a chunk and does the report's bookkeeping at a fraction of that
 * (docs/benchmarks.md, "Forensics"), so analyze runs near the speed of reading the files.
 *
 * Contract (exporter/analyze/scan.py drives it): Scanner.scan() walks whole lines from a
 * position in a chunk, in file order, and aggregates the lines whose meaning under
 * exporter.logs.parsers.RecordParser is fixed by their shape: JSON lines in the contract's
 * head order with flat values, IndexTTS text lines with a plain head, continuation and blank
 * lines. It stops at the first line it cannot vouch for ("residue") and returns it, so Python
 * parses that line in its exact place; it also stops, before a line, when one of its small
 * tables is full. Every value the report reads is checked against the parser's conversion
 * (orjson for JSON, convert_value for text); any doubt sends the line to Python. The result
 * is the one the line-by-line parser gives (tests/unit/test_analyze_scan.py checks it).
 *
 * The time range is kept exactly without converting every stamp: stamps of one layout, one
 * minute and one zone sort as text in time order, so each such class keeps its smallest and
 * largest stamp and Python converts only those. Where a line's own time is needed (a
 * --since/--until window, a failure's first/last seen), it is the minute's start as the
 * parser converts it (asked once per minute, the last 16 kept) plus the seconds and fraction,
 * which is the parser's own arithmetic.
 *
 * A Scanner keeps a reference to the parser's stamp method, which must not refer back to the
 * scanner (the type takes no part in garbage collection); scan() is not reentrant.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <float.h>
#include <stdint.h>
#include <string.h>

/* ---- name tables (event names, field names and their aliases) ------------------------ */

enum { EV_OTHER, EV_START, EV_COMPLETE, EV_STAGE, EV_GATEWAY, EV_REJECTED, N_EVENTS };
enum { F_OTHER, F_ID, F_STATUS, F_DURATION, F_CODE, F_TEXT_LEN, F_MODEL_STAGE, F_STAGE,
       F_TEXT, F_WARNING_CODE, N_FIELDS };
/* Field codes a name table may hold: analyze's N_FIELDS, or the live classifier's own list */
#define MAX_FIELDS 40

#define TABLE_SLOTS 512

typedef struct {
    char *name;
    Py_ssize_t len;
    int code;
} Entry;

typedef struct {
    Entry slot[TABLE_SLOTS];
    int used;
    /* names by (length, first byte): most keys in a line are no name here, and miss at once */
    uint64_t starts[64][4];
    int has_long;
} NameTable;

static uint32_t hash_bytes(const char *p, Py_ssize_t n) {
    uint32_t h = 2166136261u;
    for (Py_ssize_t i = 0; i < n; i++) {
        h ^= (unsigned char)p[i];
        h *= 16777619u;
    }
    return h;
}

static int table_get(const NameTable *t, const char *p, Py_ssize_t n, int missing) {
    unsigned char first = n > 0 ? (unsigned char)p[0] : 0;
    if (n < 64 ? !((t->starts[n][first >> 6] >> (first & 63)) & 1) : !t->has_long)
        return missing;
    uint32_t i = hash_bytes(p, n) & (TABLE_SLOTS - 1);
    while (t->slot[i].name != NULL) {
        if (t->slot[i].len == n && memcmp(t->slot[i].name, p, (size_t)n) == 0)
            return t->slot[i].code;
        i = (i + 1) & (TABLE_SLOTS - 1);
    }
    return missing;
}

static int table_put(NameTable *t, const char *p, Py_ssize_t n, int code) {
    if (t->used >= TABLE_SLOTS / 2) {
        PyErr_SetString(PyExc_ValueError, "too many event or field names for the scanner");
        return -1;
    }
    uint32_t i = hash_bytes(p, n) & (TABLE_SLOTS - 1);
    while (t->slot[i].name != NULL) {
        if (t->slot[i].len == n && memcmp(t->slot[i].name, p, (size_t)n) == 0) {
            t->slot[i].code = code;
            return 0;
        }
        i = (i + 1) & (TABLE_SLOTS - 1);
    }
    t->slot[i].name = PyMem_Malloc((size_t)n + 1);     /* +1: never a zero-size request */
    if (t->slot[i].name == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(t->slot[i].name, p, (size_t)n);
    t->slot[i].len = n;
    t->slot[i].code = code;
    t->used++;
    unsigned char first = n > 0 ? (unsigned char)p[0] : 0;
    if (n < 64)
        t->starts[n][first >> 6] |= (uint64_t)1 << (first & 63);
    else
        t->has_long = 1;
    return 0;
}

/* The names one reader recognises: event and field names (aliases included) by code. */
typedef struct {
    NameTable events, fields;
    int all_pairs;                 /* read every event's pairs, not only those analyze counts */
} Names;

static void table_free(NameTable *t) {
    for (int i = 0; i < TABLE_SLOTS; i++) {
        PyMem_Free(t->slot[i].name);
        t->slot[i].name = NULL;
    }
    t->used = 0;
    memset(t->starts, 0, sizeof t->starts);
    t->has_long = 0;
}

/* ---- small per-segment tables --------------------------------------------------------- */

#define SMALL_CAP 32
#define SMALL_KEY 48

/* Counts per short byte key (levels, statuses, length buckets with error codes); a segment
 * ends before a line that would need a slot when all are taken. */
typedef struct {
    int n;
    Py_ssize_t len[SMALL_CAP];
    char key[SMALL_CAP][SMALL_KEY];
    Py_ssize_t count[SMALL_CAP];
    PyObject *values[SMALL_CAP];   /* stage tables only: the durations, in file order */
} Small;

static int small_find(const Small *s, const char *p, Py_ssize_t n) {
    for (int i = 0; i < s->n; i++)
        if (s->len[i] == n && memcmp(s->key[i], p, (size_t)n) == 0)
            return i;
    return -1;
}

/* The key's slot, a new one if there is room; -1 when the table cannot take it. */
static int small_slot(Small *s, const char *p, Py_ssize_t n) {
    int i = small_find(s, p, n);
    if (i >= 0)
        return i;
    if (s->n == SMALL_CAP || n > SMALL_KEY)
        return -1;
    i = s->n++;
    memcpy(s->key[i], p, (size_t)n);
    s->len[i] = n;
    s->count[i] = 0;
    s->values[i] = NULL;
    return i;
}


/* Count one more for a key that room() (below) has accepted. */
static void small_count(Small *s, const char *p, Py_ssize_t n) {
    int i = small_slot(s, p, n);
    assert(i >= 0);
    s->count[i]++;
}

static void small_clear(Small *s) {
    for (int i = 0; i < s->n; i++)
        Py_CLEAR(s->values[i]);
    s->n = 0;
}

#define CLASS_CAP 32

/* Stamps that sort as text in time order: same format, length, minute, separators and zone.
 * lo and hi point into the chunk, so a class lives for one scan() call. */
typedef struct {
    int is_text;
    Py_ssize_t len, zone;          /* zone: where the zone suffix starts (len if none) */
    const char *lo, *hi;
} TimeClass;

/* ---- the scanner object ------------------------------------------------------------- */

#define MINUTE_CAP 16

/* A minute's start as the parser converts it, per format, minute and zone. */
typedef struct {
    int is_text;
    char key[16], zone[8];
    Py_ssize_t zone_len;
    double base;
} Minute;

#define MAX_EDGES 16

typedef struct {
    PyObject_HEAD
    Names names;
    long long edges[MAX_EDGES];
    int n_edges;
    Py_ssize_t pending_cap;
    PyObject *stamp;               /* RecordParser.stamp(str, text_format) -> float | None */
    Minute minutes[MINUTE_CAP];
    int n_minutes, next_minute;
    int busy;                      /* inside scan(): the per-segment state below is in use */
    int windowed;
    double since, until;
    /* per segment */
    Py_ssize_t lines, records, continuation;
    Small levels, statuses, lengths, stages;
    TimeClass classes[CLASS_CAP];
    int n_classes;
    PyObject *durations, *rids, *failed, *orphans, *counted;
} Scanner;

/* ---- one parsed line ----------------------------------------------------------------- */

enum { V_NONE, V_STRING, V_NUMBER, V_TRUE, V_FALSE, V_NULL, V_TOKEN };

typedef struct {
    const char *s;
    Py_ssize_t n;
    int kind;
    int is_int;                    /* V_NUMBER: an integer literal */
    int escaped;                   /* V_STRING: holds a backslash escape */
} Value;

typedef struct {
    int is_text;
    const char *stamp, *level;
    Py_ssize_t stamp_len, level_len, zone;
    int event;
    const char *event_name;        /* a text line's event name as written (NULL: free form) */
    Py_ssize_t event_len;
    Value field[MAX_FIELDS];
} Line;

static inline int is_digit(char c) { return c >= '0' && c <= '9'; }

static inline int digits(const char *p, int n) {
    for (int i = 0; i < n; i++)
        if (!is_digit(p[i]))
            return 0;
    return 1;
}

static inline int two(const char *p) { return (p[0] - '0') * 10 + (p[1] - '0'); }

static inline const char *skip_digits(const char *p, const char *e) {
    while (p < e && is_digit(*p))
        p++;
    return p;
}

static int days_in_month(int year, int month) {
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (month == 2 && year % 4 == 0 && (year % 100 != 0 || year % 400 == 0))
        return 29;
    return days[month - 1];
}

/* "YYYY-MM-DD?HH:MM:SS" with every field in range (so no conversion can fail or wrap). */
static int valid_datetime(const char *p, char sep1, char sep2) {
    if (!(digits(p, 4) && p[4] == '-' && digits(p + 5, 2) && p[7] == '-' && digits(p + 8, 2)
          && (p[10] == sep1 || p[10] == sep2) && digits(p + 11, 2) && p[13] == ':'
          && digits(p + 14, 2) && p[16] == ':' && digits(p + 17, 2)))
        return 0;
    int year = (p[0] - '0') * 1000 + (p[1] - '0') * 100 + two(p + 2);
    int month = two(p + 5), day = two(p + 8);
    return year >= 1 && month >= 1 && month <= 12 && day >= 1
           && day <= days_in_month(year, month) && two(p + 11) <= 23 && two(p + 14) <= 59
           && two(p + 17) <= 59;
}

/* A text stamp as _TEXT_HEAD reads it: the datetime, then [.,] and digits or nothing. */
static Py_ssize_t text_stamp(const char *p, const char *e) {
    if (e - p < 19 || !valid_datetime(p, ' ', 'T'))
        return 0;
    const char *q = p + 19;
    if (q < e && (*q == ',' || *q == '.') && q + 1 < e && is_digit(q[1])) {
        q++;
        q = skip_digits(q, e);
        if (q - p > 40)
            return 0;
    }
    return q - p;
}

/* A JSON time string fromisoformat reads: datetime, optional .digits, optional Z/+HH:MM.
 * Before Python 3.11 fromisoformat reads only 3 or 6 fraction digits and no Z. */
static int json_stamp(const char *p, Py_ssize_t n, Py_ssize_t *zone) {
    if (n < 19 || n > 40 || !valid_datetime(p, 'T', 'T'))
        return 0;
    const char *q = p + 19, *e = p + n;
    if (q < e && *q == '.') {
        q++;
        const char *f = q;
        q = skip_digits(q, e);
        if (q == f)
            return 0;
#if PY_VERSION_HEX < 0x030B0000
        if (q - f != 3 && q - f != 6)
            return 0;
#endif
    }
    *zone = q - p;
    if (q == e)
        return 1;
#if PY_VERSION_HEX >= 0x030B0000
    if (*q == 'Z')
        return q + 1 == e;
#endif
    return (*q == '+' || *q == '-') && e - q == 6 && digits(q + 1, 2) && q[3] == ':'
           && digits(q + 4, 2) && two(q + 1) <= 23 && two(q + 4) <= 59;
}

static inline int lit(const char **pp, const char *e, const char *text, Py_ssize_t n) {
    if (e - *pp < n || memcmp(*pp, text, (size_t)n) != 0)
        return 0;
    *pp += n;
    return 1;
}

/* A JSON string after its opening quote, without control characters; escapes only where
 * `escapes` (and then only those that always decode). Leaves *pp after the closing quote. */
static int json_string(const char **pp, const char *e, Value *v, int escapes) {
    const char *p = *pp, *s = p;
    v->escaped = 0;
    while (p < e) {
        unsigned char c = (unsigned char)*p;
        if (c == '"') {
            v->s = s;
            v->n = p - s;
            v->kind = V_STRING;
            *pp = p + 1;
            return 1;
        }
        if (c < 0x20)
            return 0;
        if (c == '\\') {
            if (!escapes || p + 1 >= e || !strchr("\"\\/bfnrt", p[1]) || p[1] == '\0')
                return 0;
            v->escaped = 1;
            p += 2;
            continue;
        }
        p++;
    }
    return 0;
}

/* -?(0|[1-9]\d{0,17})(\.\d+)?([eE][+-]?\d{1,2})?: what orjson reads as a finite number. */
static int json_number(const char **pp, const char *e, Value *v) {
    const char *p = *pp, *s = p;
    if (p < e && *p == '-')
        p++;
    if (p >= e || !is_digit(*p))
        return 0;
    if (*p == '0') {
        p++;
    } else {
        const char *d = p;
        p = skip_digits(p, e);
        if (p - d > 18)
            return 0;
    }
    v->is_int = 1;
    if (p < e && *p == '.') {
        p++;
        const char *d = p;
        p = skip_digits(p, e);
        if (p == d || p - s > 60)
            return 0;
        v->is_int = 0;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-'))
            p++;
        const char *d = p;
        p = skip_digits(p, e);
        if (p == d || p - d > 2)
            return 0;
        v->is_int = 0;
    }
    v->s = s;
    v->n = p - s;
    v->kind = V_NUMBER;
    *pp = p;
    return 1;
}

static int json_value(const char **pp, const char *e, Value *v, int escapes) {
    const char *p = *pp;
    memset(v, 0, sizeof *v);
    if (p >= e)
        return 0;
    switch (*p) {
    case '"':
        *pp = p + 1;
        return json_string(pp, e, v, escapes);
    case 't':
        v->kind = V_TRUE;
        return lit(pp, e, "true", 4);
    case 'f':
        v->kind = V_FALSE;
        return lit(pp, e, "false", 5);
    case 'n':
        v->kind = V_NULL;
        return lit(pp, e, "null", 4);
    default:
        return json_number(pp, e, v);
    }
}

/* Record one read field; a second value for the same canonical field (a repeated key or
 * two of its aliases) makes the line residue, since which one wins depends on the parser. */
static inline int set_field(Line *line, int code, const Value *v) {
    if (code == F_OTHER)
        return 1;
    if (line->field[code].kind != V_NONE)
        return 0;
    line->field[code] = *v;
    return 1;
}

/* {"time": "…", "level": "…", "logger": "…", "event": "…"(, "key": scalar)*} */
static int parse_json(const Names *nm, const char *p, const char *e, Line *line) {
    Value v;
    line->is_text = 0;
    if (!lit(&p, e, "{\"time\": \"", 10) || !json_string(&p, e, &v, 0)
        || !json_stamp(v.s, v.n, &line->zone))
        return 0;
    line->stamp = v.s;
    line->stamp_len = v.n;
    if (!lit(&p, e, ", \"level\": \"", 12) || !json_string(&p, e, &v, 0) || v.n == 0)
        return 0;
    for (Py_ssize_t i = 0; i < v.n; i++)
        if (v.s[i] < 'A' || v.s[i] > 'Z')
            return 0;
    line->level = v.s;
    line->level_len = v.n;
    if (!lit(&p, e, ", \"logger\": \"", 13) || !json_string(&p, e, &v, 0)
        || !lit(&p, e, ", \"event\": \"", 12) || !json_string(&p, e, &v, 0))
        return 0;
    line->event = table_get(&nm->events, v.s, v.n, EV_OTHER);
    for (;;) {
        if (p < e && *p == '}') {
            p++;
            break;
        }
        Value key;
        if (!lit(&p, e, ", \"", 3) || !json_string(&p, e, &key, 0) || !lit(&p, e, ": ", 2))
            return 0;
        /* a second time/level/event replaces the head's (orjson keeps the last) */
        if ((key.n == 4 && memcmp(key.s, "time", 4) == 0)
            || (key.n == 5 && memcmp(key.s, "level", 5) == 0)
            || (key.n == 5 && memcmp(key.s, "event", 5) == 0))
            return 0;
        int code = table_get(&nm->fields, key.s, key.n, F_OTHER);
        if (!json_value(&p, e, &v, code == F_OTHER) || !set_field(line, code, &v))
            return 0;
    }
    return p == e;
}

/* A text value as convert_value sees it: starts like a string (not a number, quote, space
 * or non-ASCII character, where the parser's Unicode rules apply) and is not a boolean. */
static int text_string(const Value *v) {
    if (v->n == 0)
        return 1;
    unsigned char c = (unsigned char)v->s[0];
    if (c <= ' ' || c >= 0x7f || is_digit((char)c) || c == '-' || c == '"' || c == '\'')
        return 0;
    if (v->n == 4 && PyOS_strnicmp(v->s, "true", 4) == 0)
        return 0;
    if (v->n == 5 && PyOS_strnicmp(v->s, "false", 5) == 0)
        return 0;
    return 1;
}

/* _NUMBER_WITH_UNIT in ASCII: 1 number (is_int set, *len the number's bytes), 0 a plain
 * string to the parser, -1 undecidable here (non-ASCII, too many digits). */
static int text_number(const Value *v, Py_ssize_t *len, int *is_int) {
    const char *p = v->s, *e = v->s + v->n;
    for (const char *q = p; q < e; q++)
        if ((unsigned char)*q >= 0x7f)
            return -1;
    if (p < e && *p == '-')
        p++;
    const char *d = p;
    p = skip_digits(p, e);
    if (p == d)
        return 0;
    if (p - d > 18)
        return -1;
    *is_int = 1;
    if (p + 1 < e && *p == '.' && is_digit(p[1])) {
        p++;
        p = skip_digits(p, e);
        *is_int = 0;
        if (p - v->s > 60)
            return -1;
    }
    *len = p - v->s;
    while (p < e && *p == ' ')
        p++;
    Py_ssize_t rest = e - p;
    static const char *units[] = {"", "char", "chars", "ms", "s", "kb", "KB", "B", "bytes", "%"};
    for (size_t i = 0; i < sizeof units / sizeof *units; i++)
        if ((Py_ssize_t)strlen(units[i]) == rest && memcmp(units[i], p, (size_t)rest) == 0)
            return 1;
    return 0;
}

/* key=value pairs after "event: " as _PAIR_FAST (or, with quotes, _PAIR_SPLIT) reads them:
 * ", " between pairs, no value ending in a space, quoted values only for unread keys. */
static int parse_pairs(const Names *nm, const char *p, const char *e, Line *line) {
    int quoted = memchr(p, '"', (size_t)(e - p)) != NULL
                 || memchr(p, '\'', (size_t)(e - p)) != NULL;
    for (;;) {
        const char *k = p;
        if (p >= e || !((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || *p == '_'))
            return 0;
        while (p < e && ((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || is_digit(*p)
                         || *p == '_' || *p == '.'))
            p++;
        int code = table_get(&nm->fields, k, p - k, F_OTHER);
        if (p >= e || *p != '=')
            return 0;
        p++;
        Value v = {p, 0, V_TOKEN, 0, 0};
        if (quoted && p < e && (*p == '"' || *p == '\'')) {
            /* "(?:[^"\\]|\\.)*" as _PAIR_SPLIT reads it; only for keys the report skips */
            const char quote = *p++;
            while (p < e && *p != quote)
                p += *p == '\\' && p + 1 < e ? 2 : 1;
            if (code != F_OTHER || p >= e)
                return 0;
            p++;
        } else {
            while (p < e && *p != ',') {
                unsigned char c = (unsigned char)*p;
                if (c < 0x20 || (quoted && (c == '"' || c == '\'')))
                    return 0;
                p++;
            }
            /* a trailing space, or (with quotes, where _PAIR_SPLIT strips \s) a trailing
             * non-ASCII character that may be Unicode whitespace: the parser decides */
            if (p > v.s && (p[-1] == ' ' || (quoted && code != F_OTHER
                                               && (unsigned char)p[-1] >= 0x80)))
                return 0;
        }
        v.n = p - v.s;
        if (!set_field(line, code, &v))
            return 0;
        if (p == e)
            return 1;
        if (!lit(&p, e, ", ", 2))
            return 0;
    }
}

/* Levels that normalise_level makes WARNING, ERROR or CRITICAL: the report counts such
 * records by code (Report.record_code). */
static int counted_level(const Line *line) {
    static const char *const names[] = {"WARNING", "WARN", "ERROR", "ERR", "CRITICAL", "FATAL"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if ((size_t)line->level_len == strlen(names[i])
            && memcmp(line->level, names[i], (size_t)line->level_len) == 0)
            return 1;
    return 0;
}

/* STAMP - logger - LEVEL - body; 1 a record, 0 residue. */
static int parse_text(const Names *nm, const char *p, const char *e, Line *line) {
    line->is_text = 1;
    Py_ssize_t n = text_stamp(p, e);
    if (n == 0)
        return 0;
    line->stamp = p;
    line->stamp_len = n;
    line->zone = n;
    p += n;
    if (!lit(&p, e, " - ", 3))
        return 0;
    const char *logger = p;
    while (p < e && *p > ' ' && *p < 0x7f)
        p++;
    if (p == logger || !lit(&p, e, " - ", 3))
        return 0;
    line->level = p;
    while (p < e && *p >= 'A' && *p <= 'Z')
        p++;
    line->level_len = p - line->level;
    if (line->level_len == 0 || !lit(&p, e, " - ", 3) || p >= e)
        return 0;
    line->event = EV_OTHER;
    line->event_name = NULL;
    line->event_len = 0;
    if (!((*p >= 'a' && *p <= 'z') || *p == '_'))
        /* a free-form message (e.g. "ERROR: scipy.fft failed"): level and time only */
        return (unsigned char)*p > ' ';
    const char *name = p;
    while (p < e && ((*p >= 'a' && *p <= 'z') || is_digit(*p) || *p == '_' || *p == '.'))
        p++;
    if (p == e || *p != ':')
        return 1;                  /* free-form text that starts in lower case */
    line->event = table_get(&nm->events, name, p - name, EV_OTHER);
    line->event_name = name;
    line->event_len = p - name;
    if (line->event == EV_OTHER && !counted_level(line) && !nm->all_pairs)
        return 1;                  /* event or not, the report reads only its level and time */
    p++;
    if (!lit(&p, e, " ", 1))
        return 0;
    return parse_pairs(nm, p, e, line);
}

/* ---- decimal to double ------------------------------------------------------------------ */

/* `digits[.digits][e[+-]digits]` (an optional '-' first) as the correctly rounded double that
 * Python's float() gives: 1 and *out set, or 0 where it cannot say (the line goes to the
 * parser). Clinger's fast path: a mantissa below 2^53 and a power of ten up to
 * 1e22 are exact doubles, so one IEEE multiplication or division rounds correctly; anything
 * else goes to CPython's own dtoa. (x87 double rounding would void the fast path.) */
static int to_double(const char *s, Py_ssize_t n, double *out) {
#if FLT_EVAL_METHOD == 0
    static const double powers[] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10,
                                    1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19,
                                    1e20, 1e21, 1e22};
    const char *p = s, *e = s + n;
    int negative = p < e && *p == '-';
    p += negative;
    uint64_t mantissa = 0;
    int digits = 0, scale = 0, exponent = 0, exp_negative = 0;
    for (; p < e && is_digit(*p); p++, digits++)
        mantissa = mantissa * 10 + (uint64_t)(*p - '0');
    if (p < e && *p == '.')
        for (p++; p < e && is_digit(*p); p++, digits++, scale++)
            mantissa = mantissa * 10 + (uint64_t)(*p - '0');
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-'))
            exp_negative = *p++ == '-';
        for (; p < e && is_digit(*p) && exponent < 1000; p++)
            exponent = exponent * 10 + (*p - '0');
    }
    int power = (exp_negative ? -exponent : exponent) - scale;
    if (p == e && digits <= 19 && mantissa <= ((uint64_t)1 << 53) && power >= -22
        && power <= 22) {
        double value = power < 0 ? (double)mantissa / powers[-power]
                                 : (double)mantissa * powers[power];
        *out = negative ? -value : value;
        return 1;
    }
#endif
    char buf[72];
    if (n >= (Py_ssize_t)sizeof buf)
        return 0;                          /* callers keep numbers far shorter */
    memcpy(buf, s, (size_t)n);
    buf[n] = '\0';
    *out = PyOS_string_to_double(buf, NULL, NULL);
    if (*out == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return 1;
}

/* ---- values the report reads --------------------------------------------------------- */

typedef struct {
    const char *s;
    Py_ssize_t n;
    int present;
} Bytes;

/* A string-valued field: 1 ok (present or absent), 0 residue. Absent or falsy values take
 * `fallback` when given (error_code, model_stage); `empty_ok` admits the empty string. */
static int field_string(const Line *line, int code, Bytes *out, const char *fallback,
                        int empty_ok) {
    const Value *v = &line->field[code];
    out->present = v->kind != V_NONE || fallback != NULL;
    if (!out->present)
        return 1;
    /* `value or fallback`: absent, null, false and "" are falsy; true is not ("True") */
    if (fallback != NULL && (v->kind == V_NONE || v->kind == V_NULL || v->kind == V_FALSE
                             || ((v->kind == V_STRING || v->kind == V_TOKEN) && v->n == 0))) {
        out->s = fallback;
        out->n = (Py_ssize_t)strlen(fallback);
        return 1;
    }
    out->s = v->s;
    out->n = v->n;
    if (v->n == 0 && !empty_ok)
        return 0;
    if (line->is_text)
        return v->kind == V_TOKEN && text_string(v);
    return v->kind == V_STRING && !v->escaped;
}

/* A number the report reads as float: 1 present (*out set), 0 absent, -1 residue. */
static int field_number(const Line *line, int code, double *out) {
    const Value *v = &line->field[code];
    Py_ssize_t len = v->n;
    int is_int = 0;
    if (v->kind == V_NONE)
        return 0;
    if (line->is_text) {
        if (v->kind != V_TOKEN || text_number(v, &len, &is_int) != 1)
            return -1;
    } else if (v->kind != V_NUMBER) {
        return -1;
    }
    if (line->is_text ? is_int : v->is_int) {
        char buf[32];                  /* integer literals are at most 18 digits and a sign */
        memcpy(buf, v->s, (size_t)len);
        buf[len] = '\0';
        *out = (double)strtoll(buf, NULL, 10);     /* int first, as the parser has it: -0 is 0 */
        return 1;
    }
    return to_double(v->s, len, out) ? 1 : -1;
}

/* text_len: 1 an int (*out), 0 not an int to the report (absent, a string, a float),
 * -1 residue (a boolean, which Python counts as an int, or an undecidable value). */
static int field_int(const Line *line, int code, long long *out) {
    const Value *v = &line->field[code];
    Py_ssize_t len;
    int is_int;
    if (v->kind == V_NONE)
        return 0;
    if (line->is_text) {
        if (v->n > 0 && (is_digit(v->s[0]) || v->s[0] == '-')) {
            int r = text_number(v, &len, &is_int);
            if (r != 1)
                return r;          /* 0: a string such as "12abc" */
            if (!is_int)
                return 0;
        } else {
            return text_string(v) ? 0 : -1;
        }
    } else {
        if (v->kind != V_NUMBER || !v->is_int)
            return -1;
        len = v->n;
    }
    char buf[32];                      /* at most 18 digits and a sign (text_number, json_number) */
    memcpy(buf, v->s, (size_t)len);
    buf[len] = '\0';
    *out = strtoll(buf, NULL, 10);
    return 1;
}

static PyObject *decode(const char *s, Py_ssize_t n) {
    return PyUnicode_DecodeUTF8(s, n, "replace");
}

/* ---- a line's time ------------------------------------------------------------------- */

/* The line's time as RecordParser.stamp gives it: 1 set, 0 no time (residue), -1 error.
 * Text: mktime(minute) + seconds + float("0." + fraction); JSON: timegm or mktime of the
 * minute + seconds + microseconds / 1e6 (fromisoformat keeps six digits). */
static int line_time(Scanner *sc, const Line *line, double *out) {
    const char *s = line->stamp;
    Py_ssize_t zone_len = line->stamp_len - line->zone;
    Minute *m = NULL;
    if (zone_len > 8)
        return 0;
    for (int i = 0; i < sc->n_minutes && m == NULL; i++) {
        Minute *c = &sc->minutes[i];
        if (c->is_text == line->is_text && c->zone_len == zone_len && memcmp(c->key, s, 16) == 0
            && memcmp(c->zone, s + line->zone, (size_t)zone_len) == 0)
            m = c;
    }
    if (m == NULL) {
        char text[16 + 3 + 8];
        memcpy(text, s, 16);
        memcpy(text + 16, ":00", 3);
        memcpy(text + 19, s + line->zone, (size_t)zone_len);
        PyObject *when = PyObject_CallFunction(sc->stamp, "s#O", text, 19 + zone_len,
                                               line->is_text ? Py_True : Py_False);
        if (when == NULL)
            return -1;
        double base = when == Py_None ? 0.0 : PyFloat_AsDouble(when);
        int none = when == Py_None;
        Py_DECREF(when);
        if (none)
            return 0;
        if (base == -1.0 && PyErr_Occurred())
            return -1;
        if (sc->n_minutes < MINUTE_CAP) {
            m = &sc->minutes[sc->n_minutes++];
        } else {
            m = &sc->minutes[sc->next_minute];
            sc->next_minute = (sc->next_minute + 1) % MINUTE_CAP;
        }
        m->is_text = line->is_text;
        memcpy(m->key, s, 16);
        memcpy(m->zone, s + line->zone, (size_t)zone_len);
        m->zone_len = zone_len;
        m->base = base;
    }
    double when = m->base + two(s + 17);
    Py_ssize_t digits_len = line->zone - 20;      /* the fraction's digits, after [.,] */
    if (digits_len <= 0) {
        *out = when + 0.0;
    } else if (line->is_text) {
        char buf[48] = "0.";
        double fraction;
        memcpy(buf + 2, s + 20, (size_t)digits_len);
        if (!to_double(buf, 2 + digits_len, &fraction))
            return 0;
        *out = when + fraction;
    } else {
        long micro = 0;
        for (int i = 0; i < 6; i++)
            micro = micro * 10 + (i < digits_len ? s[20 + i] - '0' : 0);
        *out = when + micro / 1e6;
    }
    return 1;
}

/* ---- applying a line ------------------------------------------------------------------ */

enum { APPLIED, RESIDUE, FULL, FAILED };

/* Whether a small table can count this key: a key no table could ever hold makes the line
 * residue (ending the segment instead would stop at the same line for ever). */
static int room(const Small *s, const char *p, Py_ssize_t n) {
    if (n > SMALL_KEY)
        return RESIDUE;
    return small_find(s, p, n) >= 0 || s->n < SMALL_CAP ? APPLIED : FULL;
}

static int bucket_of(const Scanner *sc, long long text_len) {
    for (int i = 0; i < sc->n_edges; i++)
        if (text_len <= sc->edges[i])
            return i;
    return sc->n_edges;
}

/* The length table's key for a bucket and an error code ("" for a success). */
static Py_ssize_t length_key(char *key, int bucket, const Bytes *code) {
    key[0] = (char)bucket;
    if (code->n >= SMALL_KEY)
        return SMALL_KEY + 1;                 /* too long: room() refuses it */
    memcpy(key + 1, code->s, (size_t)code->n);
    return code->n + 1;
}

/* The line's stamp class, or NULL. */
static TimeClass *find_class(Scanner *sc, const Line *line) {
    for (int i = 0; i < sc->n_classes; i++) {
        TimeClass *c = &sc->classes[i];
        if (c->is_text == line->is_text && c->len == line->stamp_len && c->zone == line->zone
            && memcmp(c->lo, line->stamp, 17) == 0
            && (c->len <= 19 || c->lo[19] == line->stamp[19])
            && memcmp(c->lo + c->zone, line->stamp + c->zone, (size_t)(c->len - c->zone)) == 0)
            return c;
    }
    return NULL;
}

static int class_has_room(Scanner *sc, const Line *line) {
    return sc->n_classes < CLASS_CAP || find_class(sc, line) != NULL;
}

/* Widen the line's class to its stamp (class_has_room said there is a place). */
static void class_add(Scanner *sc, const Line *line) {
    TimeClass *c = find_class(sc, line);
    if (c == NULL) {
        c = &sc->classes[sc->n_classes++];
        c->is_text = line->is_text;
        c->len = line->stamp_len;
        c->zone = line->zone;
        c->lo = c->hi = line->stamp;
        return;
    }
    if (memcmp(line->stamp, c->lo, (size_t)c->len) < 0)
        c->lo = line->stamp;
    if (memcmp(line->stamp, c->hi, (size_t)c->len) > 0)
        c->hi = line->stamp;
}

static int push(PyObject *list, PyObject *item) {
    if (item == NULL)
        return -1;
    int r = PyList_Append(list, item);
    Py_DECREF(item);
    return r;
}

/* A text without text_len: the report takes its length in characters (Report.text_length),
 * which only Python's decoding gives exactly. */
static int text_only(const Line *line) {
    return line->field[F_TEXT_LEN].kind == V_NONE && line->field[F_TEXT].kind != V_NONE;
}

static int apply_start(Scanner *sc, const Line *line, PyObject *pending) {
    Bytes id = {0};
    long long text_len = 0;
    if (text_only(line) || !field_string(line, F_ID, &id, NULL, 0))
        return RESIDUE;
    int has_len = field_int(line, F_TEXT_LEN, &text_len);
    if (has_len < 0)
        return RESIDUE;
    if (!id.present || !has_len)
        return APPLIED;
    PyObject *rid = decode(id.s, id.n), *value = PyLong_FromLongLong(text_len);
    int r = rid && value ? PyObject_SetItem(pending, rid, value) : -1;
    Py_XDECREF(rid);
    Py_XDECREF(value);
    if (r < 0)
        return FAILED;
    /* the same cap and oldest-first eviction as Report.start */
    if (PyObject_Length(pending) > sc->pending_cap) {
        PyObject *old = PyObject_CallMethod(pending, "popitem", "O", Py_False);
        if (old == NULL)
            return FAILED;
        Py_DECREF(old);
    }
    return APPLIED;
}

static int apply_stage(Scanner *sc, const Line *line) {
    Bytes stage;
    double value;
    if (!field_string(line, F_STAGE, &stage, NULL, 1) || !stage.present
        || field_number(line, F_DURATION, &value) != 1)
        return RESIDUE;
    int r = room(&sc->stages, stage.s, stage.n);
    if (r != APPLIED)
        return r;
    int i = small_slot(&sc->stages, stage.s, stage.n);
    assert(i >= 0);
    if (sc->stages.values[i] == NULL && (sc->stages.values[i] = PyList_New(0)) == NULL)
        return FAILED;
    return push(sc->stages.values[i], PyFloat_FromDouble(value)) < 0 ? FAILED : APPLIED;
}

/* A synthesis_complete; `when` is the line's time where the caller already has it (NULL:
 * computed here, for failures only). */
static int apply_complete(Scanner *sc, const Line *line, PyObject *pending, PyObject *pop,
                          const double *when_known) {
    Bytes id = {0}, status = {0}, code = {0}, model_stage = {0};
    double duration = 0.0;
    long long own_len = 0;
    if (text_only(line) || !field_string(line, F_ID, &id, NULL, 0) || !id.present
        || !field_string(line, F_STATUS, &status, NULL, 0)
        || !field_string(line, F_CODE, &code, "UNKNOWN", 1)
        || !field_string(line, F_MODEL_STAGE, &model_stage, "unknown", 1))
        return RESIDUE;
    int has_duration = field_number(line, F_DURATION, &duration);
    int has_len = field_int(line, F_TEXT_LEN, &own_len);
    if (has_duration < 0 || has_len < 0)
        return RESIDUE;
    if (!status.present) {
        status.s = "unknown";
        status.n = 7;
    }
    int failed = status.n == 6 && memcmp(status.s, "failed", 6) == 0;
    Bytes no_code = {"", 0, 1};
    const Bytes *length_code = failed ? &code : &no_code;

    PyObject *rid = decode(id.s, id.n);
    if (rid == NULL)
        return FAILED;
    /* the length bucket: the line's own text_len, else its start's (looked up, not popped,
     * until every table is known to have room) */
    PyObject *start_len = NULL;
    int bucket = -1;
    if (has_len) {
        bucket = bucket_of(sc, own_len);
    } else {
        start_len = PyDict_GetItemWithError(pending, rid);
        if (start_len == NULL && PyErr_Occurred())
            goto fail;
        if (start_len != NULL) {
            int overflow;
            long long value = PyLong_AsLongLongAndOverflow(start_len, &overflow);
            if (value == -1 && PyErr_Occurred())
                goto fail;
            bucket = overflow > 0 ? sc->n_edges : overflow < 0 ? 0 : bucket_of(sc, value);
        }
    }
    double when = when_known != NULL ? *when_known : 0.0;
    int r = failed && when_known == NULL ? line_time(sc, line, &when) : 1;
    if (r <= 0) {
        Py_DECREF(rid);
        return r < 0 ? FAILED : RESIDUE;
    }
    char key[SMALL_KEY + 2];
    Py_ssize_t key_len = length_key(key, bucket, length_code);
    r = room(&sc->statuses, status.s, status.n);
    if (r == APPLIED && bucket >= 0)
        r = room(&sc->lengths, key, key_len);
    if (r != APPLIED) {
        Py_DECREF(rid);
        return r;
    }
    small_count(&sc->statuses, status.s, status.n);
    if (has_duration) {
        if (push(sc->durations, PyFloat_FromDouble(duration)) < 0
            || PyList_Append(sc->rids, rid) < 0)
            goto fail;
    }
    PyObject *popped = PyObject_CallFunctionObjArgs(pop, rid, Py_None, NULL);
    if (popped == NULL)
        goto fail;
    Py_DECREF(popped);
    if (bucket >= 0) {
        small_count(&sc->lengths, key, key_len);
    } else if (push(sc->orphans, Py_BuildValue("(ON)", rid,
                                               decode(length_code->s, length_code->n))) < 0) {
        goto fail;
    }
    if (failed && push(sc->failed, Py_BuildValue(
            "(NNdO)", decode(code.s, code.n), decode(model_stage.s, model_stage.n), when,
            rid)) < 0)
        goto fail;
    Py_DECREF(rid);
    return APPLIED;
fail:
    Py_DECREF(rid);
    return FAILED;
}

/* A counted record's code as Report.add takes it, `warning_code or error_code or "none"`,
 * and its id: 1 ok, 0 residue (a code or id that is not a plain string). */
static int record_code(const Line *line, Bytes *code, Bytes *id) {
    Bytes warning;
    if (!field_string(line, F_WARNING_CODE, &warning, "", 1)
        || !field_string(line, F_CODE, code, "none", 1)
        || !field_string(line, F_ID, id, NULL, 0))
        return 0;
    if (warning.n > 0)
        *code = warning;
    return 1;
}

/* Validate everything a line needs before changing anything, then add it. Rejections and the
 * gateway's lines are few and read by the parser (residue). */
static int apply_record(Scanner *sc, const Line *line, PyObject *pending, PyObject *pop) {
    double when = 0.0;
    if (line->event == EV_GATEWAY || line->event == EV_REJECTED)
        return RESIDUE;
    if (sc->windowed) {
        int t = line_time(sc, line, &when);
        if (t <= 0)
            return t < 0 ? FAILED : RESIDUE;
        if (!(when >= sc->since && when < sc->until))
            /* outside --since/--until only starts count: their text lengths serve
             * failures inside the window */
            return line->event == EV_START ? apply_start(sc, line, pending) : APPLIED;
    }
    int counted = counted_level(line);
    Bytes code = {0}, id = {0};
    if (counted) {
        if (!record_code(line, &code, &id))
            return RESIDUE;
        if (!sc->windowed) {
            int t = line_time(sc, line, &when);
            if (t <= 0)
                return t < 0 ? FAILED : RESIDUE;
        }
    }
    int r = room(&sc->levels, line->level, line->level_len);
    if (r != APPLIED)
        return r;
    if (!class_has_room(sc, line))
        return FULL;
    if (line->event == EV_START)
        r = apply_start(sc, line, pending);
    else if (line->event == EV_COMPLETE)
        r = apply_complete(sc, line, pending, pop, sc->windowed || counted ? &when : NULL);
    else if (line->event == EV_STAGE)
        r = apply_stage(sc, line);
    if (r != APPLIED)
        return r;
    if (counted) {
        PyObject *rid = id.present ? decode(id.s, id.n) : Py_NewRef(Py_None);
        if (rid == NULL || push(sc->counted, Py_BuildValue(
                "(y#NdN)", line->level, line->level_len, decode(code.s, code.n), when,
                rid)) < 0)
            return FAILED;
    }
    small_count(&sc->levels, line->level, line->level_len);
    class_add(sc, line);
    return APPLIED;
}

/* ---- the segment's result -------------------------------------------------------------- */

static void segment_clear(Scanner *sc) {
    sc->lines = sc->records = sc->continuation = 0;
    small_clear(&sc->levels);
    small_clear(&sc->statuses);
    small_clear(&sc->lengths);
    small_clear(&sc->stages);
    sc->n_classes = 0;
    Py_CLEAR(sc->durations);
    Py_CLEAR(sc->rids);
    Py_CLEAR(sc->failed);
    Py_CLEAR(sc->orphans);
    Py_CLEAR(sc->counted);
}

static int segment_start(Scanner *sc) {
    segment_clear(sc);
    sc->durations = PyList_New(0);
    sc->rids = PyList_New(0);
    sc->failed = PyList_New(0);
    sc->orphans = PyList_New(0);
    sc->counted = PyList_New(0);
    return sc->durations && sc->rids && sc->failed && sc->orphans && sc->counted ? 0 : -1;
}

enum { BYTES_COUNTS, STR_COUNTS, BUCKET_COUNTS, STR_LISTS };

/* The table as a dict: keys as bytes, str or (bucket, str); values the counts, or (stages)
 * the duration lists. */
static PyObject *small_dict(const Small *s, int shape) {
    PyObject *d = PyDict_New();
    for (int i = 0; d != NULL && i < s->n; i++) {
        PyObject *key = shape == BYTES_COUNTS ? PyBytes_FromStringAndSize(s->key[i], s->len[i])
                        : shape == BUCKET_COUNTS
                            ? Py_BuildValue("(iN)", (int)(unsigned char)s->key[i][0],
                                            decode(s->key[i] + 1, s->len[i] - 1))
                            : decode(s->key[i], s->len[i]);
        PyObject *value = shape == STR_LISTS ? Py_NewRef(s->values[i])
                                             : PyLong_FromSsize_t(s->count[i]);
        if (key == NULL || value == NULL || PyDict_SetItem(d, key, value) < 0)
            Py_CLEAR(d);
        Py_XDECREF(key);
        Py_XDECREF(value);
    }
    return d;
}

static PyObject *segment_result(Scanner *sc) {
    PyObject *classes = PyList_New(0);
    for (int i = 0; classes != NULL && i < sc->n_classes; i++) {
        const TimeClass *c = &sc->classes[i];
        if (push(classes, Py_BuildValue("(Oy#y#)", c->is_text ? Py_True : Py_False, c->lo,
                                        c->len, c->hi, c->len)) < 0)
            Py_CLEAR(classes);
    }
    if (classes == NULL)
        return NULL;
    return Py_BuildValue("{s:n,s:n,s:n,s:N,s:N,s:N,s:N,s:N,s:O,s:O,s:O,s:O,s:O}",
                         "lines", sc->lines, "records", sc->records,
                         "continuation", sc->continuation,
                         "levels", small_dict(&sc->levels, BYTES_COUNTS),
                         "statuses", small_dict(&sc->statuses, STR_COUNTS),
                         "lengths", small_dict(&sc->lengths, BUCKET_COUNTS),
                         "stages", small_dict(&sc->stages, STR_LISTS), "classes", classes,
                         "durations", sc->durations, "rids", sc->rids, "failed", sc->failed,
                         "orphans", sc->orphans, "counted", sc->counted);
}

static int blank(const char *p, const char *e) {
    for (; p < e; p++)
        if (!strchr(" \t\r\x0b\x0c", *p) || *p == '\0')
            return 0;
    return 1;
}

/* scan(chunk, pos, pending, window) -> (next_pos, residue line or None, segment) */
static PyObject *Scanner_scan(Scanner *sc, PyObject *args) {
    Py_buffer chunk;
    Py_ssize_t pos;
    PyObject *pending, *window;
    if (!PyArg_ParseTuple(args, "y*nOO", &chunk, &pos, &pending, &window))
        return NULL;
    const char *problem = sc->busy ? "scan() is not reentrant"
                          : !PyODict_Check(pending) ? "pending must be an OrderedDict"
                          : window != Py_None && !PyTuple_Check(window)
                              ? "window must be None or (since, until)" : NULL;
    if (problem != NULL) {
        PyBuffer_Release(&chunk);
        PyErr_SetString(sc->busy ? PyExc_RuntimeError : PyExc_TypeError, problem);
        return NULL;
    }
    sc->windowed = window != Py_None;
    if (sc->windowed && !PyArg_ParseTuple(window, "dd", &sc->since, &sc->until)) {
        PyBuffer_Release(&chunk);
        return NULL;
    }
    sc->busy = 1;
    PyObject *result = NULL, *residue = Py_None, *pop = NULL;
    const char *base = chunk.buf, *end = base + chunk.len;
    if (pos < 0 || pos > chunk.len) {
        PyErr_SetString(PyExc_ValueError, "pos is outside the chunk");
        goto done;
    }
    if (segment_start(sc) < 0 || (pop = PyObject_GetAttrString(pending, "pop")) == NULL)
        goto done;
    const char *p = base + pos;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        const char *next = eol ? eol + 1 : end;
        const char *e = eol ? eol : end;
        const char *stripped = e;
        while (stripped > p && stripped[-1] == '\r')
            stripped--;
        if (stripped == p || (*p != '{' && !is_digit(*p))) {
            if (!blank(p, e)) {
                sc->lines++;
                sc->continuation++;
            }
            p = next;
            continue;
        }
        Line line;
        memset(line.field, 0, sizeof line.field[0] * N_FIELDS);
        int parsed = *p == '{' ? parse_json(&sc->names, p, stripped, &line)
                               : parse_text(&sc->names, p, stripped, &line);
        int r = parsed ? apply_record(sc, &line, pending, pop) : RESIDUE;
        if (r == FAILED)
            goto done;
        if (r == FULL)
            break;
        if (r == RESIDUE) {
            residue = PyBytes_FromStringAndSize(p, e - p);
            if (residue == NULL)
                goto done;
            p = next;
            break;
        }
        sc->lines++;
        sc->records++;
        p = next;
    }
    PyObject *segment = segment_result(sc);
    if (segment != NULL)
        result = Py_BuildValue("(nON)", (Py_ssize_t)(p - base), residue, segment);
done:
    Py_XDECREF(pop);
    if (residue != Py_None)
        Py_DECREF(residue);
    segment_clear(sc);
    sc->busy = 0;
    PyBuffer_Release(&chunk);
    return result;
}

/* ---- construction --------------------------------------------------------------------- */

static int code_of(PyObject *name, const char *const *names, int n) {
    for (int i = 0; i < n; i++)
        if (PyUnicode_CompareWithASCIIString(name, names[i]) == 0)
            return i;
    return 0;
}

static int fill(NameTable *t, PyObject *mapping, const char *const *names, int n) {
    PyObject *key, *value;
    Py_ssize_t i = 0;
    if (!PyDict_Check(mapping)) {
        PyErr_SetString(PyExc_TypeError, "names must be a dict of bytes to str");
        return -1;
    }
    while (PyDict_Next(mapping, &i, &key, &value)) {
        if (!PyBytes_Check(key) || !PyUnicode_Check(value)) {
            PyErr_SetString(PyExc_TypeError, "names must be a dict of bytes to str");
            return -1;
        }
        if (table_put(t, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key),
                      code_of(value, names, n)) < 0)
            return -1;
    }
    return 0;
}

static const char *const EVENT_NAMES[] = {"", "synthesis_start", "synthesis_complete",
                                          "stage_time", "gateway_request", "request_rejected"};
static const char *const FIELD_NAMES[] = {"", "id", "status", "duration_ms", "error_code",
                                          "text_len", "model_stage", "stage", "text",
                                          "warning_code"};

static int Scanner_init(Scanner *sc, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"events", "fields", "length_edges", "pending_cap", "stamp", NULL};
    PyObject *events, *fields, *edges, *stamp;
    Py_ssize_t cap;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOnO", kwlist, &events, &fields, &edges,
                                     &cap, &stamp))
        return -1;
    if (!PyCallable_Check(stamp)) {
        PyErr_SetString(PyExc_TypeError, "stamp must be callable");
        return -1;
    }
    Py_INCREF(stamp);
    Py_XSETREF(sc->stamp, stamp);
    sc->n_minutes = sc->next_minute = 0;
    table_free(&sc->names.events);
    table_free(&sc->names.fields);
    if (fill(&sc->names.events, events, EVENT_NAMES, N_EVENTS) < 0
        || fill(&sc->names.fields, fields, FIELD_NAMES, N_FIELDS) < 0)
        return -1;
    PyObject *seq = PySequence_Fast(edges, "length_edges must be a sequence of ints");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_EDGES) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "too many length edges");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        sc->edges[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (sc->edges[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    sc->n_edges = (int)n;
    sc->pending_cap = cap;
    return 0;
}

static void Scanner_dealloc(Scanner *sc) {
    segment_clear(sc);
    Py_CLEAR(sc->stamp);
    table_free(&sc->names.events);
    table_free(&sc->names.fields);
    Py_TYPE(sc)->tp_free((PyObject *)sc);
}

static PyMethodDef Scanner_methods[] = {
    {"scan", (PyCFunction)Scanner_scan, METH_VARARGS,
     "scan(chunk, pos, pending, window) -> (next_pos, residue, segment)\n\n"
     "Aggregate the lines from pos on until one only the full parser may read (returned "
     "as residue, next_pos after it) or a table fills (residue None). window: None or "
     "(since, until); records outside it count only as lines, starts also in pending."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "exporter.analyze._scan.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Line-shape scanner for analyze (see exporter/analyze/scan.py). Holds the "
              "parser's stamp method, which must not refer back to the scanner.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Scanner_init,
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_methods = Scanner_methods,
};

/* ---- the live pipeline's line classifier ------------------------------------------- */

/* Classifier.classify(data) serves exporter.logs.pipeline.LogPipeline with the same line
 * recogniser (parse_text, parse_pairs) that Scanner uses. For each IndexTTS text line whose
 * shape fixes its meaning it gives what RecordParser.fields gives (level, event, and the
 * fields the pipeline reads) without the parser's regexes; every other record-like line
 * comes back as text for the parser, in its place. Only the conversion of numbers is done
 * here, where float() on the text value is known to give the same double; everything else
 * (types, ranges, labels, budgets, metrics) stays with the pipeline's Python handlers. */

enum { K_STRING, K_NUMBER, K_LABEL };
/* What a spec entry is (pipeline.py NUMBER, LABEL, FLAG, TEXT): a number converted here, a
 * label whose value as written is part of the line's kind, a flag (is the value one of the
 * true values) that is too, and the text whose length stands in for a missing class number
 * (such a line is the handler's: only Python's decoding gives that length). */
enum { S_NUMBER = 1, S_LABEL, S_FLAG, S_TEXT };

#define MAX_SPEC 24
#define MAX_KIND_LABELS 4
#define MAX_KIND_FLAGS 8
#define MAX_NUMBERS 16
#define MAX_CLASSES 8

typedef struct {
    int n;
    unsigned char code[MAX_SPEC], kind[MAX_SPEC];
    int n_numbers, n_labels, n_flags;
    int class_number;              /* the number whose class is part of the kind */
    int n_bounds;
    double bounds[MAX_CLASSES];    /* class i: the first bound the number does not exceed */
} Spec;

#define CACHE_SLOTS 512
#define CACHE_KEY 32
#define LEVEL_SLOTS 8

/* One str per short byte string (label values, unknown event names), so repeated values
 * cost no allocation and hit the pipeline's label maps by identity. */
typedef struct {
    Py_ssize_t len;
    char key[CACHE_KEY];
    PyObject *value;
} CacheSlot;

typedef struct {
    PyObject_HEAD
    Names names;
    PyObject *events;              /* tuple: event code -> canonical event name */
    PyObject *fields;              /* tuple: field code -> canonical field name */
    PyObject *level_names;         /* dict: level as written (bytes) -> parser's level */
    PyObject *empty;               /* "" */
    PyObject *true_values;         /* the flag values that are true */
    PyObject *counted_levels;      /* levels whose records the pipeline counts by code */
    double max_number;
    Py_ssize_t max_exemplar;       /* longest request id an exemplar takes */
    int id_code, status_code;      /* field codes of "id" and "status" (0: not read) */
    Spec *specs;                   /* per event code (n = 0: the event has none) */
    Py_ssize_t n_events;
    int n_fields;
    unsigned char kind[MAX_FIELDS];
    CacheSlot levels[LEVEL_SLOTS];
    int n_levels;
    CacheSlot cache[CACHE_SLOTS];
} Classifier;

/* A str of ASCII bytes (classify() takes only printable ASCII lines). */
static PyObject *ascii_str(const char *s, Py_ssize_t n) {
    PyObject *u = PyUnicode_New(n, 127);
    if (u != NULL)
        memcpy(PyUnicode_1BYTE_DATA(u), s, (size_t)n);
    return u;
}

static PyObject *cached_str(Classifier *c, const char *s, Py_ssize_t n) {
    if (n > CACHE_KEY)
        return ascii_str(s, n);
    CacheSlot *slot = &c->cache[hash_bytes(s, n) & (CACHE_SLOTS - 1)];
    if (slot->value != NULL && slot->len == n && memcmp(slot->key, s, (size_t)n) == 0)
        return Py_NewRef(slot->value);
    PyObject *value = ascii_str(s, n);
    if (value == NULL)
        return NULL;
    Py_XSETREF(slot->value, Py_NewRef(value));
    slot->len = n;
    memcpy(slot->key, s, (size_t)n);
    return value;
}

/* The level as the parser names it: the level aliases (WARN -> WARNING, ...) applied. */
static PyObject *level_str(Classifier *c, const char *s, Py_ssize_t n) {
    for (int i = 0; i < c->n_levels; i++)
        if (c->levels[i].len == n && memcmp(c->levels[i].key, s, (size_t)n) == 0)
            return Py_NewRef(c->levels[i].value);
    PyObject *key = PyBytes_FromStringAndSize(s, n);
    if (key == NULL)
        return NULL;
    PyObject *value = PyDict_GetItemWithError(c->level_names, key);
    Py_DECREF(key);
    if (value != NULL)
        Py_INCREF(value);
    else if (!PyErr_Occurred())
        value = ascii_str(s, n);
    if (value != NULL && n <= CACHE_KEY && c->n_levels < LEVEL_SLOTS) {
        CacheSlot *slot = &c->levels[c->n_levels++];
        slot->len = n;
        memcpy(slot->key, s, (size_t)n);
        slot->value = Py_NewRef(value);
    }
    return value;
}

/* float(value) as the pipeline's _number reads a text value: digits, optionally a fraction,
 * alone or before a space (there float() fails and the first word is read). 1 and *out set,
 * 0 where the value goes to Python as it is written. */
static int live_number(const Value *v, double *out) {
    const char *p = v->s, *e = v->s + v->n, *d = p;
    p = skip_digits(p, e);
    if (p == d)
        return 0;
    if (p < e && *p == '.') {
        const char *f = ++p;
        p = skip_digits(p, e);
        if (p == f)
            return 0;
    }
    if (p < e && *p != ' ')
        return 0;
    return to_double(v->s, p - v->s, out);
}

static PyObject *field_value(Classifier *c, int code, const Value *v) {
    double number;
    if (c->kind[code] == K_NUMBER && live_number(v, &number))
        return PyFloat_FromDouble(number);
    return c->kind[code] == K_LABEL ? cached_str(c, v->s, v->n) : ascii_str(v->s, v->n);
}

/* ---- runs of whole syntheses ------------------------------------------------------------- */

/* Consecutive lines of a spec's event that this code read whole: per line the index of its
 * kind (labels, flags, which numbers it carries, its class: all the pipeline needs to decide
 * what such a line does) and its numbers. LogPipeline._count_run decides once per kind and
 * apply() carries that out line by line, in line order, so each sum is added up exactly as
 * the pipeline's own per-line code adds it. */

#define RUN_KINDS 64

typedef struct {
    PyObject *label[MAX_KIND_LABELS];   /* borrowed from the kind's tuple; NULL: absent */
    unsigned flags, present;
    int cls;
    uint32_t hash;
} KindKey;

typedef struct {
    PyObject_HEAD
    Py_ssize_t n, cap;
    int event, n_numbers, n_labels, n_flags;
    unsigned char *kind;           /* per line: its kind's index */
    double *numbers;               /* per line: n_numbers numbers (0 where absent) */
    PyObject **ids;                /* per line: the request id an exemplar takes, or NULL */
    PyObject *kinds;               /* list of kind tuples, in order of first appearance */
    PyObject *kept;                /* list of (id, event, line, status) of lines with an id */
    int n_kinds;
    KindKey keys[RUN_KINDS];
} SynthesisRun;

static PyTypeObject SynthesisRunType;

/* The run lines are joining while classify() walks a chunk: where it sits in the items, and
 * its first line (a run that ends with that one line is given back as a plain item). */
typedef struct {
    SynthesisRun *run;             /* borrowed from the items; NULL: none open */
    Py_ssize_t at;
    const char *p, *e;
} OpenRun;

static int close_run(Classifier *c, PyObject *items, OpenRun *open);

static SynthesisRun *run_new(int event, const Spec *spec) {
    SynthesisRun *run = PyObject_New(SynthesisRun, &SynthesisRunType);
    if (run == NULL)
        return NULL;
    run->n = run->cap = 0;
    run->event = event;
    run->n_numbers = spec->n_numbers;
    run->n_labels = spec->n_labels;
    run->n_flags = spec->n_flags;
    run->kind = NULL;
    run->numbers = NULL;
    run->ids = NULL;
    run->n_kinds = 0;
    run->kinds = PyList_New(0);
    run->kept = PyList_New(0);
    if (run->kinds == NULL || run->kept == NULL) {
        Py_DECREF(run);
        return NULL;
    }
    return run;
}

static void SynthesisRun_dealloc(SynthesisRun *run) {
    for (Py_ssize_t i = 0; i < run->n; i++)
        Py_XDECREF(run->ids[i]);
    PyMem_Free(run->kind);
    PyMem_Free(run->numbers);
    PyMem_Free(run->ids);
    Py_XDECREF(run->kinds);
    Py_XDECREF(run->kept);
    PyObject_Free(run);
}

static Py_ssize_t SynthesisRun_len(SynthesisRun *run) { return run->n; }

static int same_label(PyObject *a, PyObject *b) {
    if (a == b)
        return 1;
    if (a == NULL || b == NULL)
        return 0;
    Py_ssize_t n = PyUnicode_GET_LENGTH(a);
    return n == PyUnicode_GET_LENGTH(b)
           && memcmp(PyUnicode_1BYTE_DATA(a), PyUnicode_1BYTE_DATA(b), (size_t)n) == 0;
}

/* The index of this kind in the run (added if new), or -1: the run holds RUN_KINDS kinds
 * (the line starts the next run), or -2: an error. Steals nothing. */
static int run_kind(SynthesisRun *run, PyObject *const *label, unsigned flags,
                    unsigned present, int cls) {
    uint32_t h = 2166136261u ^ (flags * 16777619u) ^ (present * 2654435761u)
                 ^ ((uint32_t)(cls + 1) * 40503u);
    for (int i = 0; i < run->n_labels; i++)
        if (label[i] != NULL) {
            Py_ssize_t n = PyUnicode_GET_LENGTH(label[i]);
            h = (h ^ hash_bytes((const char *)PyUnicode_1BYTE_DATA(label[i]), n)) * 16777619u;
        } else {
            h = (h ^ 0x9e3779b9u) * 16777619u;
        }
    for (int k = 0; k < run->n_kinds; k++) {
        const KindKey *key = &run->keys[k];
        if (key->hash != h || key->flags != flags || key->present != present
            || key->cls != cls)
            continue;
        int same = 1;
        for (int i = 0; same && i < run->n_labels; i++)
            same = same_label(key->label[i], label[i]);
        if (same)
            return k;
    }
    if (run->n_kinds == RUN_KINDS)
        return -1;
    PyObject *tuple = PyTuple_New(run->n_labels + run->n_flags + 2);
    if (tuple == NULL)
        return -2;
    int at = 0;
    KindKey *key = &run->keys[run->n_kinds];
    for (int i = 0; i < run->n_labels; i++) {
        key->label[i] = label[i];
        PyTuple_SET_ITEM(tuple, at++, Py_NewRef(label[i] != NULL ? label[i] : Py_None));
    }
    for (int i = 0; i < run->n_flags; i++)
        PyTuple_SET_ITEM(tuple, at++, Py_NewRef(flags & (1u << i) ? Py_True : Py_False));
    PyObject *p = PyLong_FromUnsignedLong(present), *k = PyLong_FromLong(cls);
    if (p == NULL || k == NULL) {
        Py_XDECREF(p);
        Py_XDECREF(k);
        Py_DECREF(tuple);
        return -2;
    }
    PyTuple_SET_ITEM(tuple, at++, p);
    PyTuple_SET_ITEM(tuple, at, k);
    if (PyList_Append(run->kinds, tuple) < 0) {
        Py_DECREF(tuple);
        return -2;
    }
    Py_DECREF(tuple);              /* the list keeps it, and with it the borrowed labels */
    key->flags = flags;
    key->present = present;
    key->cls = cls;
    key->hash = h;
    return run->n_kinds++;
}

static int run_room(SynthesisRun *run) {
    if (run->n < run->cap)
        return 0;
    Py_ssize_t cap = run->cap ? 2 * run->cap : 256;
    unsigned char *kind = PyMem_Realloc(run->kind, (size_t)cap);
    if (kind != NULL)
        run->kind = kind;
    double *numbers = kind ? PyMem_Realloc(run->numbers, sizeof(double) * (size_t)cap
                                                         * (size_t)(run->n_numbers + 1))
                           : NULL;
    if (numbers != NULL)
        run->numbers = numbers;
    PyObject **ids = numbers ? PyMem_Realloc(run->ids, sizeof(PyObject *) * (size_t)cap) : NULL;
    if (ids == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    run->ids = ids;
    run->cap = cap;
    return 0;
}

/* A text line of an event with a spec, read whole into *run (a new one when NULL, or full of
 * kinds, pushed to items): 1; 0 where the line is the handler's (a number this code does not
 * vouch for, a counted level, a text standing in for its class number); -1 an error. */
static int run_line(Classifier *c, const Line *line, const char *p, const char *e,
                    PyObject *items, OpenRun *open, int keep) {
    const Spec *spec = &c->specs[line->event];
    double numbers[MAX_NUMBERS];
    unsigned present = 0, flags = 0;
    int slot = 0, text = 0, n_labels = 0, n_flags = 0;
    const Value *labels[MAX_KIND_LABELS], *flag_values[MAX_KIND_FLAGS];
    for (int i = 0; i < spec->n; i++) {
        const Value *v = &line->field[spec->code[i]];
        switch (spec->kind[i]) {
        case S_NUMBER:
            numbers[slot] = 0.0;
            if (v->kind != V_NONE) {
                if (!live_number(v, &numbers[slot]) || !(numbers[slot] <= c->max_number))
                    return 0;
                present |= 1u << slot;
            }
            slot++;
            break;
        case S_LABEL:
            labels[n_labels++] = v->kind != V_NONE ? v : NULL;
            break;
        case S_FLAG:
            flag_values[n_flags++] = v->kind != V_NONE ? v : NULL;
            break;
        default:
            text |= v->kind != V_NONE;
        }
    }
    int cls = -1;
    if (present & (1u << spec->class_number)) {
        double x = numbers[spec->class_number];
        for (cls = 0; cls < spec->n_bounds && x > spec->bounds[cls]; cls++)
            ;
    } else if (text) {
        return 0;
    }
    PyObject *level = level_str(c, line->level, line->level_len);
    int counted = level != NULL ? PySet_Contains(c->counted_levels, level) : -1;
    Py_XDECREF(level);
    if (counted != 0)
        return counted > 0 ? 0 : -1;

    PyObject *label[MAX_KIND_LABELS] = {NULL}, *status = NULL, *id = NULL, *kept = NULL;
    int r = -1;
    for (int i = 0; i < n_labels; i++)
        if (labels[i] != NULL && (label[i] = cached_str(c, labels[i]->s, labels[i]->n)) == NULL)
            goto done;
    for (int i = 0; i < n_flags; i++) {
        if (flag_values[i] == NULL)
            continue;
        PyObject *value = cached_str(c, flag_values[i]->s, flag_values[i]->n);
        int truth = value != NULL ? PySet_Contains(c->true_values, value) : -1;
        Py_XDECREF(value);
        if (truth < 0)
            goto done;
        flags |= (unsigned)truth << i;
    }
    const Value *idv = c->id_code ? &line->field[c->id_code] : NULL;
    if (idv != NULL && idv->kind != V_NONE && idv->n > 0
        && (id = ascii_str(idv->s, idv->n)) == NULL)
        goto done;
    if (keep && id != NULL) {
        const Value *sv = c->status_code ? &line->field[c->status_code] : NULL;
        status = sv != NULL && sv->kind != V_NONE ? cached_str(c, sv->s, sv->n)
                                                  : Py_NewRef(Py_None);
        PyObject *text_line = status != NULL ? ascii_str(p, e - p) : NULL;
        kept = text_line != NULL
               ? PyTuple_Pack(4, id, PyTuple_GET_ITEM(c->events, line->event), text_line,
                              status)
               : NULL;
        Py_XDECREF(text_line);
        if (kept == NULL)
            goto done;
    }
    if (open->run != NULL && open->run->event != line->event
        && close_run(c, items, open) < 0)   /* a run holds one event's lines */
        goto done;
    for (int attempt = 0; attempt < 2; attempt++) {
        if (open->run == NULL) {
            SynthesisRun *fresh = run_new(line->event, spec);
            open->at = PyList_GET_SIZE(items);
            if (fresh == NULL || PyList_Append(items, (PyObject *)fresh) < 0) {
                Py_XDECREF(fresh);
                goto done;
            }
            Py_DECREF(fresh);      /* items keeps it */
            open->run = fresh;
            open->p = p;
            open->e = e;
        }
        int k = run_kind(open->run, label, flags, present, cls);
        if (k == -2)
            goto done;
        if (k == -1) {             /* full of kinds (so of lines too): the next one starts */
            open->run = NULL;
            continue;
        }
        SynthesisRun *rn = open->run;
        if (run_room(rn) < 0 || (kept != NULL && PyList_Append(rn->kept, kept) < 0))
            goto done;
        rn->kind[rn->n] = (unsigned char)k;
        memcpy(&rn->numbers[rn->n * rn->n_numbers], numbers,
               sizeof(double) * (size_t)rn->n_numbers);
        rn->ids[rn->n] = id != NULL && PyUnicode_GET_LENGTH(id) <= c->max_exemplar
                         ? Py_NewRef(id) : NULL;
        rn->n++;
        r = 1;
        break;
    }
done:
    for (int i = 0; i < n_labels; i++)
        Py_XDECREF(label[i]);
    Py_XDECREF(status);
    Py_XDECREF(id);
    Py_XDECREF(kept);
    return r;
}

/* apply(plans, sums, bounds): see SynthesisRun_methods. */
typedef struct {
    int target, number, scale;
} Step;

enum { SCALE_AS_IS, SCALE_MS, SCALE_KIB };

static PyObject *SynthesisRun_apply(SynthesisRun *run, PyObject *args) {
    PyObject *plans, *sums, *bounds;
    if (!PyArg_ParseTuple(args, "O!O!O!", &PyList_Type, &plans, &PyList_Type, &sums,
                          &PyList_Type, &bounds))
        return NULL;
    Py_ssize_t n_targets = PyList_GET_SIZE(sums);
    if (PyList_GET_SIZE(plans) != run->n_kinds || PyList_GET_SIZE(bounds) != n_targets) {
        PyErr_SetString(PyExc_ValueError, "one plan per kind, one bound list per sum");
        return NULL;
    }
    PyObject *result = NULL;
    double *sum = PyMem_Calloc((size_t)n_targets + 1, sizeof(double));
    Py_ssize_t *first = PyMem_Calloc((size_t)n_targets + 1, sizeof(Py_ssize_t));
    Py_ssize_t *n_bounds = PyMem_Calloc((size_t)n_targets + 1, sizeof(Py_ssize_t));
    unsigned char *histogram = PyMem_Calloc((size_t)n_targets + 1, 1);
    Step *steps[RUN_KINDS] = {NULL};
    int n_steps[RUN_KINDS] = {0};
    double *bound = NULL, *ex_value = NULL;
    long long *count = NULL;
    Py_ssize_t *ex_line = NULL, total = 0, failed = 0;
    if (sum == NULL || first == NULL || n_bounds == NULL || histogram == NULL)
        goto nomem;
    for (Py_ssize_t t = 0; t < n_targets; t++) {
        sum[t] = PyFloat_AsDouble(PyList_GET_ITEM(sums, t));
        if (sum[t] == -1.0 && PyErr_Occurred())
            goto done;
        PyObject *b = PyList_GET_ITEM(bounds, t);
        first[t] = total;
        if (b != Py_None) {
            Py_ssize_t n = PySequence_Size(b);
            if (n < 0)
                goto done;
            histogram[t] = 1;
            n_bounds[t] = n;
            total += n + 1;        /* its buckets, +Inf last */
        }
    }
    bound = PyMem_Calloc((size_t)total + 1, sizeof(double));
    count = PyMem_Calloc((size_t)total + 1, sizeof(long long));
    ex_line = PyMem_Malloc(((size_t)total + 1) * sizeof(Py_ssize_t));
    ex_value = PyMem_Calloc((size_t)total + 1, sizeof(double));
    if (bound == NULL || count == NULL || ex_line == NULL || ex_value == NULL)
        goto nomem;
    for (Py_ssize_t i = 0; i < total; i++)
        ex_line[i] = -1;
    for (Py_ssize_t t = 0; t < n_targets; t++) {
        PyObject *b = PyList_GET_ITEM(bounds, t);
        for (Py_ssize_t i = 0; i < n_bounds[t]; i++) {
            PyObject *item = PySequence_GetItem(b, i);
            double x = item != NULL ? PyFloat_AsDouble(item) : -1.0;
            Py_XDECREF(item);
            if (x == -1.0 && PyErr_Occurred())
                goto done;
            bound[first[t] + i] = x;
        }
    }
    for (int k = 0; k < run->n_kinds; k++) {
        PyObject *plan = PyList_GET_ITEM(plans, k);
        if (plan == Py_None) {
            n_steps[k] = -1;
            continue;
        }
        Py_ssize_t n = PySequence_Size(plan);
        if (n < 0 || n > 64) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a plan has at most 64 steps");
            goto done;
        }
        steps[k] = PyMem_Calloc((size_t)n + 1, sizeof(Step));
        if (steps[k] == NULL)
            goto nomem;
        n_steps[k] = (int)n;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PySequence_GetItem(plan, i);
            Step *s = &steps[k][i];
            int ok = item != NULL && PyArg_ParseTuple(item, "iii", &s->target, &s->number,
                                                      &s->scale);
            Py_XDECREF(item);
            if (!ok)
                goto done;
            if (s->target < 0 || s->target >= n_targets || s->number < -1
                || s->number >= run->n_numbers || s->scale < SCALE_AS_IS
                || s->scale > SCALE_KIB) {
                PyErr_SetString(PyExc_ValueError, "a step is (target, number or -1, scale)");
                goto done;
            }
        }
    }
    for (Py_ssize_t line = 0; line < run->n; line++) {
        int k = run->kind[line];
        if (n_steps[k] < 0) {
            failed++;
            continue;
        }
        const double *numbers = &run->numbers[line * run->n_numbers];
        for (int i = 0; i < n_steps[k]; i++) {
            const Step *s = &steps[k][i];
            double v = s->number < 0 ? 1.0 : numbers[s->number];
            if (s->scale == SCALE_MS)
                v = v / 1000.0;
            else if (s->scale == SCALE_KIB)
                v = v * 1024.0;
            sum[s->target] += v;
            if (!histogram[s->target])
                continue;
            Py_ssize_t n = n_bounds[s->target];
            const double *b = &bound[first[s->target]];
            Py_ssize_t lo = 0, hi = n;      /* bisect_left: the first bound not below v */
            while (lo < hi) {
                Py_ssize_t mid = (lo + hi) / 2;
                if (b[mid] < v)
                    lo = mid + 1;
                else
                    hi = mid;
            }
            Py_ssize_t at = first[s->target] + lo;
            count[at]++;
            if (run->ids[line] != NULL) {
                ex_line[at] = line;
                ex_value[at] = v;
            }
        }
    }
    PyObject *out_sums = PyList_New(n_targets), *out_counts = PyList_New(n_targets),
             *out_ex = PyList_New(n_targets);
    if (out_sums == NULL || out_counts == NULL || out_ex == NULL)
        goto built;
    for (Py_ssize_t t = 0; t < n_targets; t++) {
        PyObject *s = PyFloat_FromDouble(sum[t]), *c = PyList_New(0), *x = PyList_New(0);
        if (s == NULL || c == NULL || x == NULL) {
            Py_XDECREF(s);
            Py_XDECREF(c);
            Py_XDECREF(x);
            goto built;
        }
        PyList_SET_ITEM(out_sums, t, s);
        PyList_SET_ITEM(out_counts, t, c);
        PyList_SET_ITEM(out_ex, t, x);
        for (Py_ssize_t i = 0; histogram[t] && i <= n_bounds[t]; i++) {
            Py_ssize_t at = first[t] + i;
            if (count[at] > 0 && push(c, Py_BuildValue("(nL)", i, count[at])) < 0)
                goto built;
            if (ex_line[at] >= 0
                && push(x, Py_BuildValue("(nOd)", i, run->ids[ex_line[at]], ex_value[at])) < 0)
                goto built;
        }
    }
    result = Py_BuildValue("(OOOn)", out_sums, out_counts, out_ex, failed);
built:
    Py_XDECREF(out_sums);
    Py_XDECREF(out_counts);
    Py_XDECREF(out_ex);
    goto done;
nomem:
    PyErr_NoMemory();
done:
    for (int k = 0; k < RUN_KINDS; k++)
        PyMem_Free(steps[k]);
    PyMem_Free(sum);
    PyMem_Free(first);
    PyMem_Free(n_bounds);
    PyMem_Free(histogram);
    PyMem_Free(bound);
    PyMem_Free(count);
    PyMem_Free(ex_line);
    PyMem_Free(ex_value);
    return result;
}

static PyMethodDef SynthesisRun_methods[] = {
    {"apply", (PyCFunction)SynthesisRun_apply, METH_VARARGS,
     "apply(plans, sums, bounds) -> (sums, counts, exemplars, failed)\n\n"
     "Carry out each line's plan (plans[kind]: (target, number or -1 for 1, scale) steps; "
     "None: the kind's lines fail) in line order: sums (one per target, its value before) "
     "grow by each step's amount (scale 0 as is, 1 ms -> s, 2 KiB -> bytes); a target with "
     "bounds (a histogram's, else None) also counts the amount in its bucket. counts: per "
     "target, (bucket, count) of the buckets that grew; exemplars: (bucket, request id, "
     "amount) of each bucket's last line with an id; failed: the lines without a plan."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef SynthesisRun_members[] = {
    {"kinds", T_OBJECT, offsetof(SynthesisRun, kinds), READONLY,
     "each kind of line (labels, flags, numbers present, class), in order of first "
     "appearance"},
    {"kept", T_OBJECT, offsetof(SynthesisRun, kept), READONLY,
     "(id, event, line, status) of each line with a request id, when classify kept them"},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods SynthesisRun_as_sequence = {
    .sq_length = (lenfunc)SynthesisRun_len,
};

static PyTypeObject SynthesisRunType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "exporter.analyze._scan.SynthesisRun",
    .tp_basicsize = sizeof(SynthesisRun),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Consecutive syntheses the Classifier read whole (see LogPipeline._count_run).",
    .tp_dealloc = (destructor)SynthesisRun_dealloc,
    .tp_methods = SynthesisRun_methods,
    .tp_members = SynthesisRun_members,
    .tp_as_sequence = &SynthesisRun_as_sequence,
};

/* ---- classify ------------------------------------------------------------------------------ */

/* (level, event, fields, line) of a text record line that parse_text read, or NULL. */
static PyObject *line_item(Classifier *c, const Line *line, const char *p, const char *e) {
    PyObject *level = level_str(c, line->level, line->level_len);
    PyObject *event = line->event_name == NULL ? Py_NewRef(c->empty)
                      : line->event != EV_OTHER
                          ? Py_NewRef(PyTuple_GET_ITEM(c->events, line->event))
                          : cached_str(c, line->event_name, line->event_len);
    PyObject *fields = PyDict_New();
    PyObject *text = ascii_str(p, e - p);
    PyObject *item = NULL;
    if (level == NULL || event == NULL || fields == NULL || text == NULL)
        goto done;
    for (int code = 1; code < c->n_fields; code++) {
        const Value *v = &line->field[code];
        if (v->kind == V_NONE)
            continue;
        PyObject *value = field_value(c, code, v);
        if (value == NULL
            || PyDict_SetItem(fields, PyTuple_GET_ITEM(c->fields, code), value) < 0) {
            Py_XDECREF(value);
            goto done;
        }
        Py_DECREF(value);
    }
    item = PyTuple_Pack(4, level, event, fields, text);
    /* A batch makes thousands of these; the collector need not visit them, as CPython
     * would decide itself on its next pass: strings and a dict that stays untracked while
     * it holds only strings and floats. */
    if (item != NULL && !PyObject_GC_IsTracked(fields))
        PyObject_GC_UnTrack(item);
done:
    Py_XDECREF(level);
    Py_XDECREF(event);
    Py_XDECREF(fields);
    Py_XDECREF(text);
    if (item == NULL && !PyErr_Occurred())
        PyErr_NoMemory();
    return item;
}

/* Stop joining lines to the open run. A run of one line becomes that line's plain item: for
 * a lone synthesis among other lines, the handler costs less than deciding a run. */
static int close_run(Classifier *c, PyObject *items, OpenRun *open) {
    SynthesisRun *run = open->run;
    open->run = NULL;
    if (run == NULL || run->n != 1)
        return 0;
    Line line;
    memset(line.field, 0, sizeof line.field[0] * (size_t)c->n_fields);
    if (!parse_text(&c->names, open->p, open->e, &line)) {
        PyErr_SetString(PyExc_RuntimeError, "a line read whole no longer parses");
        return -1;
    }
    PyObject *item = line_item(c, &line, open->p, open->e);
    return item == NULL ? -1 : PyList_SetItem(items, open->at, item);
}

/* A text record line: read whole into the open run (1), or (level, event, fields, line)
 * pushed to items (1); 0: the parser's; -1: an error. */
static int classify_text(Classifier *c, const char *p, const char *e, PyObject *items,
                         OpenRun *open, int keep) {
    for (const char *q = p; q < e; q++)
        if ((unsigned char)*q < 0x20 || (unsigned char)*q >= 0x7f)
            return 0;              /* Unicode rules, control characters: the parser's */
    Line line;
    memset(line.field, 0, sizeof line.field[0] * (size_t)c->n_fields);
    if (!parse_text(&c->names, p, e, &line))
        return 0;
    if (line.event != EV_OTHER && c->specs[line.event].n > 0) {
        int r = run_line(c, &line, p, e, items, open, keep);
        if (r != 0)
            return r;
    }
    if (close_run(c, items, open) < 0)
        return -1;
    return push(items, line_item(c, &line, p, e)) < 0 ? -1 : 1;
}

/* classify(data, keep=True) -> (items, continuation): see Classifier_methods. */
static PyObject *Classifier_classify(Classifier *c, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"data", "keep", NULL};
    Py_buffer chunk;
    int keep = 1;
    if (c->events == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the Classifier was not initialised");
        return NULL;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|p", kwlist, &chunk, &keep))
        return NULL;
    PyObject *items = PyList_New(0), *result = NULL;
    OpenRun open = {NULL, 0, NULL, NULL};
    Py_ssize_t continuation = 0;
    const char *p = chunk.buf, *end = p + chunk.len;
    if (items == NULL)
        goto done;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        const char *e = eol ? eol : end, *next = eol ? eol + 1 : end;
        if (eol != NULL && e > p && e[-1] == '\r')
            e--;                   /* the pipeline reads "\r\n" as "\n" */
        if (e == p || (*p != '{' && !is_digit(*p))) {
            continuation++;        /* blank, or continues a record (a traceback) */
            p = next;
            continue;
        }
        int r = is_digit(*p) ? classify_text(c, p, e, items, &open, keep) : 0;
        if (r < 0)
            goto done;
        if (r == 0 && (close_run(c, items, &open) < 0
                       || push(items, PyUnicode_DecodeUTF8(p, e - p, "replace")) < 0))
            goto done;
        p = next;
    }
    if (close_run(c, items, &open) == 0)
        result = Py_BuildValue("(On)", items, continuation);
done:
    Py_XDECREF(items);
    PyBuffer_Release(&chunk);
    return result;
}

/* Put every name -> canonical name of `mapping` in `t`, numbering the canonical names from 1
 * in order of first appearance in `canon` (a list that starts with ""). */
static int fill_codes(NameTable *t, PyObject *mapping, PyObject *canon, Py_ssize_t max) {
    PyObject *key, *value;
    Py_ssize_t i = 0;
    if (!PyDict_Check(mapping)) {
        PyErr_SetString(PyExc_TypeError, "names must be a dict of bytes to str");
        return -1;
    }
    while (PyDict_Next(mapping, &i, &key, &value)) {
        if (!PyBytes_Check(key) || !PyUnicode_Check(value)) {
            PyErr_SetString(PyExc_TypeError, "names must be a dict of bytes to str");
            return -1;
        }
        int found = PySequence_Contains(canon, value);
        if (found < 0)
            return -1;
        Py_ssize_t code = found ? PySequence_Index(canon, value) : PyList_GET_SIZE(canon);
        if (code < 0)
            return -1;
        if (code >= max) {
            PyErr_SetString(PyExc_ValueError, "too many field names for the classifier");
            return -1;
        }
        if ((!found && PyList_Append(canon, value) < 0)
            || table_put(t, PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key), (int)code) < 0)
            return -1;
    }
    return 0;
}

static void Classifier_clear_tables(Classifier *c) {
    table_free(&c->names.events);
    table_free(&c->names.fields);
    Py_CLEAR(c->events);
    Py_CLEAR(c->fields);
    Py_CLEAR(c->level_names);
    Py_CLEAR(c->empty);
    Py_CLEAR(c->true_values);
    Py_CLEAR(c->counted_levels);
    c->id_code = c->status_code = 0;
    PyMem_Free(c->specs);
    c->specs = NULL;
    c->n_events = 0;
    for (int i = 0; i < c->n_levels; i++)
        Py_CLEAR(c->levels[i].value);
    c->n_levels = 0;
    for (int i = 0; i < CACHE_SLOTS; i++)
        Py_CLEAR(c->cache[i].value);
}

/* The specs (event name -> (((field name, kind), ...), class number, class bounds)) by event
 * code. */
static int fill_specs(Classifier *c, PyObject *specs, PyObject *event_list,
                      PyObject *field_list) {
    PyObject *event, *value;
    Py_ssize_t pos = 0;
    c->n_events = PyList_GET_SIZE(event_list);
    c->specs = PyMem_Calloc((size_t)c->n_events, sizeof(Spec));
    if (c->specs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    while (PyDict_Next(specs, &pos, &event, &value)) {
        PyObject *spec, *bounds;
        int class_number;
        if (!PyArg_ParseTuple(value, "OiO", &spec, &class_number, &bounds))
            return -1;
        Py_ssize_t code = PySequence_Index(event_list, event);
        PyObject *entries = code >= 0 ? PySequence_Fast(spec, "a spec must be a sequence")
                                      : NULL;
        PyObject *edges = entries ? PySequence_Fast(bounds, "bounds must be a sequence") : NULL;
        if (edges == NULL) {
            Py_XDECREF(entries);
            return -1;
        }
        Spec *s = &c->specs[code];
        s->n = (int)PySequence_Fast_GET_SIZE(entries);
        s->n_bounds = (int)PySequence_Fast_GET_SIZE(edges);
        int ok = s->n <= MAX_SPEC && s->n_bounds <= MAX_CLASSES;
        for (int i = 0; ok && i < s->n_bounds; i++) {
            s->bounds[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(edges, i));
            ok = !(s->bounds[i] == -1.0 && PyErr_Occurred());
        }
        for (int i = 0; ok && i < s->n; i++) {
            const char *name;
            int kind;
            ok = PyArg_ParseTuple(PySequence_Fast_GET_ITEM(entries, i), "si", &name, &kind)
                 && kind >= S_NUMBER && kind <= S_TEXT;
            if (!ok)
                break;
            PyObject *field = PyUnicode_FromString(name);
            Py_ssize_t field_code = field ? PySequence_Index(field_list, field) : -1;
            Py_XDECREF(field);
            if (field_code < 0) {  /* a spec may name only fields the classifier reads */
                Py_DECREF(entries);
                Py_DECREF(edges);
                return -1;
            }
            s->code[i] = (unsigned char)field_code;
            s->kind[i] = (unsigned char)kind;
            s->n_numbers += kind == S_NUMBER;
            s->n_labels += kind == S_LABEL;
            s->n_flags += kind == S_FLAG;
        }
        s->class_number = class_number;
        ok = ok && s->n_numbers <= MAX_NUMBERS && s->n_labels <= MAX_KIND_LABELS
             && s->n_flags <= MAX_KIND_FLAGS && class_number >= 0
             && class_number < s->n_numbers;
        Py_DECREF(entries);
        Py_DECREF(edges);
        if (!ok) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError,
                                "a spec is ((field, 1|2|3|4), ...), a number index, bounds");
            s->n = 0;
            return -1;
        }
    }
    return 0;
}

static int Classifier_init(Classifier *c, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"events", "fields", "numbers", "labels", "levels", "specs",
                             "true_values", "max_number", "counted_levels",
                             "max_exemplar_chars", NULL};
    PyObject *events, *fields, *numbers, *labels, *levels, *specs, *true_values, *counted;
    double max_number;
    Py_ssize_t max_exemplar;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO!O!O!dO!n", kwlist, &events, &fields,
                                     &numbers, &labels, &PyDict_Type, &levels, &PyDict_Type,
                                     &specs, &PyFrozenSet_Type, &true_values, &max_number,
                                     &PyFrozenSet_Type, &counted, &max_exemplar))
        return -1;
    Classifier_clear_tables(c);
    c->names.all_pairs = 1;
    c->max_number = max_number;
    c->max_exemplar = max_exemplar;
    c->counted_levels = Py_NewRef(counted);
    c->true_values = Py_NewRef(true_values);
    c->level_names = Py_NewRef(levels);
    c->empty = PyUnicode_New(0, 127);
    PyObject *event_list = Py_BuildValue("[s]", ""), *field_list = Py_BuildValue("[s]", "");
    int r = -1;
    if (c->empty == NULL || event_list == NULL || field_list == NULL
        || fill_codes(&c->names.events, events, event_list, PY_SSIZE_T_MAX) < 0
        || fill_codes(&c->names.fields, fields, field_list, MAX_FIELDS) < 0)
        goto done;
    c->n_fields = (int)PyList_GET_SIZE(field_list);
    for (int code = 1; code < c->n_fields; code++) {
        PyObject *name = PyList_GET_ITEM(field_list, code);
        int number = PySequence_Contains(numbers, name), label = PySequence_Contains(labels, name);
        if (number < 0 || label < 0)
            goto done;
        c->kind[code] = number ? K_NUMBER : label ? K_LABEL : K_STRING;
        if (PyUnicode_CompareWithASCIIString(name, "id") == 0)
            c->id_code = code;
        if (PyUnicode_CompareWithASCIIString(name, "status") == 0)
            c->status_code = code;
    }
    if (fill_specs(c, specs, event_list, field_list) < 0)
        goto done;
    c->events = PyList_AsTuple(event_list);
    c->fields = PyList_AsTuple(field_list);
    r = c->events != NULL && c->fields != NULL ? 0 : -1;
done:
    Py_XDECREF(event_list);
    Py_XDECREF(field_list);
    return r;
}

static void Classifier_dealloc(Classifier *c) {
    Classifier_clear_tables(c);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static PyMethodDef Classifier_methods[] = {
    {"classify", (PyCFunction)(void (*)(void))Classifier_classify,
     METH_VARARGS | METH_KEYWORDS,
     "classify(data, keep=True) -> (items, continuation)\n\n"
     "The record lines of data (bytes; lines end in \\n, \\r\\n read as \\n) in file "
     "order: a SynthesisRun for consecutive lines of an event with a spec that this code "
     "reads whole (keep: with their kept lines), (level, event, fields, line) for another "
     "text record whose shape fixes what RecordParser.fields gives (fields: the named ones "
     "only, numbers as float where float() gives the same), else the line as str for the "
     "parser. continuation: the blank lines and lines that do not start with '{' or a "
     "digit."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ClassifierType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "exporter.analyze._scan.Classifier",
    .tp_basicsize = sizeof(Classifier),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Line classifier for the live pipeline (see exporter/logs/pipeline.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Classifier_init,
    .tp_dealloc = (destructor)Classifier_dealloc,
    .tp_methods = Classifier_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_scan",
    "Compiled line scanner for tts-exporter analyze and the live pipeline.", -1, NULL, NULL,
    NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scan(void) {
    if (PyType_Ready(&ScannerType) < 0 || PyType_Ready(&ClassifierType) < 0
        || PyType_Ready(&SynthesisRunType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Scanner", (PyObject *)&ScannerType) < 0
        || PyModule_AddObjectRef(m, "Classifier", (PyObject *)&ClassifierType) < 0
        || PyModule_AddObjectRef(m, "SynthesisRun", (PyObject *)&SynthesisRunType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
