"""Fixed inputs for backend parity tests: short, medium, truncated-long, unicode, blank-looking, punctuation."""
from __future__ import annotations

_LONG_PROSE = (
    "Vector databases store high-dimensional embeddings and answer nearest-neighbour queries. "
    "An embedding model maps each passage to a point so that similar meanings land close together. "
)

LONG_TEXTS: list[str] = [
    _LONG_PROSE * 12,                                           # ~400 tokens of prose
    "token " * 600,                                             # one word repeated far past 256
    " ".join(f"item{i}" for i in range(400)),                   # many distinct sub-word pieces
    ("データベースは埋め込みベクトルを保存します。" * 40),            # long CJK
]

SHORT_TEXTS: list[str] = [
    "hello",
    "Hello, world!",
    "a",
    "   ",
    "\t\n",
    "\u00a0",
    "",
    "?!",
    "...",
    "--- *** ---",
    "(parenthetical) [bracketed] {braced} <angled>",
    "e-mail: someone@example.com, url: https://example.com/a?b=c&d=e#f",
    "The quick brown fox jumps over the lazy dog.",
    "the quick brown fox jumps over the lazy dog",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
    "I love this product 😍🔥👍",
    "🙂",
    "Café, naïve, façade, résumé, jalapeño",
    "Größenordnung und Straße",
    "Москва — столица России.",
    "Η γρήγορη καφέ αλεπού",
    "北京是中国的首都。",
    "東京は日本の首都です。",
    "서울은 한국의 수도입니다.",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "x = 3.14159; y = 2.71828; print(x * y)",
    "def embed(texts): return model.encode(texts)",
    "SELECT id, name FROM users WHERE age > 30 ORDER BY name;",
    "1234567890",
    "2024-01-15T12:30:00Z",
    "$100.00 (USD) — 15% off!!!",
    "line one\nline two\nline three",
    "tabs\tbetween\twords",
    "multiple     spaces     inside",
    "   leading and trailing spaces   ",
    "zero\u200bwidth\u200bspace",
    "combining e\u0301 accent",
]

MEDIUM_TEXTS: list[str] = [
    "Embeddings turn text into vectors; cosine similarity between two vectors approximates how "
    "related the two texts are, which is what semantic search relies on.",
    "The supervisor spawns one worker process per backend, restarts it when it crashes, and "
    "routes requests so that a slow model never blocks a fast one.",
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin walked on the surface "
    "while Michael Collins orbited above in the command module.",
    "Photosynthesis converts light energy into chemical energy: carbon dioxide and water become "
    "glucose and oxygen inside the chloroplasts of plant cells.",
    "To reset your password, open Settings, choose Account, then Security, and follow the link "
    "we email you. The link expires after 24 hours.",
    "Mixed language: the word 'embedding' is 埋め込み in Japanese and 嵌入 in Chinese; "
    "in German one might say Einbettung.",
    "Q: What is the capital of France? A: Paris. Q: And of Italy? A: Rome. Q: Spain? A: Madrid.",
    "Customer review: arrived late 😞 but the quality is great ⭐⭐⭐⭐ — would buy again, maybe.",
    "Recipe: whisk two eggs, add 200 g flour and 300 ml milk, rest the batter for 30 minutes, "
    "then fry thin pancakes in a hot buttered pan.",
    "Error: connection refused (ECONNREFUSED) at 127.0.0.1:5555 — is the server running? "
    "Retrying in 2 s with exponential backoff.",
]

PARITY_TEXTS: list[str] = SHORT_TEXTS + MEDIUM_TEXTS + LONG_TEXTS

# A small, fast subset for slow runtimes (MLX on Linux CPU): blanks, unicode, medium, one long.
MLX_TEXTS: list[str] = [
    "hello", "   ", "\t\n", "", "?!", "I love this product 😍🔥👍", "北京是中国的首都。",
    "Москва — столица России.", "The quick brown fox jumps over the lazy dog.",
    MEDIUM_TEXTS[0], MEDIUM_TEXTS[5], LONG_TEXTS[1],
]

assert len(PARITY_TEXTS) >= 50
