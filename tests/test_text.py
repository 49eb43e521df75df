"The text library: tokenizer rules on tricky strings, parallel and cached tokenising, vocabulary, LM streams, padded batches."
import pickle

import pytest
import torch

from lessonlib.text.tokenize import (Tokenizer, tokenize_texts, tokenize_cached, tokens_key, load_tokens, save_tokens,
                                     SPECIAL_TOKENS)
from lessonlib.text.data import (make_vocab, Numericalize, LMLoader, SortedTextLoader, pad_batch, lm_dataloaders,
                                 clas_dataloaders)
from lessonlib.text.models import (get_language_model, get_text_classifier, SMALL_CONFIG, masked_concat_pool,
                                   clas_splitter, lm_splitter)

TOK = Tokenizer()


@pytest.mark.parametrize('text,expected', [
    ("didn't", ['did', "n't"]),
    ("you're", ['you', "'re"]),
    ("I'm sure they'll, we've, he'd", ['xxmaj', 'i', "'m", 'sure', 'they', "'ll", ',', 'we', "'ve", ',', 'he', "'d"]),
    ('THE END', ['xxup', 'the', 'xxup', 'end']),
    ('Hello world', ['xxmaj', 'hello', 'world']),
    ('line one<br /><br />line two', ['line', 'one', 'line', 'two']),
    ('Tom &amp; Jerry &quot;rock&quot;', ['xxmaj', 'tom', '&', 'xxmaj', 'jerry', '"', 'rock', '"']),
    ('soooo good!!!!', ['s', 'xxrep', '4', 'o', 'good', 'xxrep', '4', '!']),
    ('very very very VERY good', ['xxwrep', '4', 'very', 'good']),
    ('it\u2019s fine', ['it', "'s", 'fine']),
    ('', []),
])
def test_tokenizer_rules(text, expected):
    assert Tokenizer(bos=False)(text) == expected
    assert TOK(text) == ['xxbos'] + expected


def test_tokens_have_no_spaces_and_specials_first():
    toks = TOK('A  B\tC\n\nD e-mail 3.5 \u00e9t\u00e9 <i>x</i>')
    assert all(t and not any(c.isspace() for c in t) for t in toks)
    assert SPECIAL_TOKENS[:3] == ['xxunk', 'xxpad', 'xxbos']


def test_parallel_equals_serial_and_cache(tmp_path):
    texts = [f"Review {i}: I didn't like it, it's AWFUL!!! <br />Score {i % 10}/10" for i in range(300)]
    serial = tokenize_texts(texts, n_workers=1)
    assert tokenize_texts(texts, n_workers=2, min_parallel=100, chunk=64) == serial
    assert tokenize_cached(texts, cache=tmp_path) == serial
    files = list(tmp_path.glob('tokens-*.txt'))
    assert len(files) == 1 and files[0].name == f'tokens-{tokens_key(texts, TOK)}.txt'

    class Boom(Tokenizer):
        def __call__(self, t): raise AssertionError('tokenised again')
    assert tokenize_cached(texts, Boom(), cache=tmp_path) == serial      # same rules key: read from the cache
    files[0].write_text('# lessonlib tokens n=300\ncut short')
    assert tokenize_cached(texts, cache=tmp_path) == serial              # damaged cache: made again
    assert load_tokens(files[0]) == serial


def test_vocab_numericalize_round_trip():
    docs = [TOK(t) for t in ['A good film.', 'A bad film.', 'Good, good.']]
    vocab = make_vocab(docs, min_freq=1)
    assert vocab[:len(SPECIAL_TOKENS)] == SPECIAL_TOKENS and len(vocab) % 8 == 0
    num = Numericalize(vocab)
    for d in docs: assert num.decode(num(d)) == d
    assert num.decode(num(['good', 'never-seen'])) == ['good', 'xxunk']
    small = make_vocab(docs, min_freq=2)
    assert 'bad' not in small and 'good' in small and 'film' in small


def test_lm_batches_continue_row_by_row():
    docs = [torch.arange(s, s + n) for s, n in ((0, 7), (7, 13), (20, 30), (50, 51))]
    dl = LMLoader(docs, bs=3, bptt=5)
    stream = torch.arange(101)
    n = (101 - 1) // 3
    batches = list(dl)
    assert len(batches) == len(dl) == -(-n // 5)
    for i, (x, y) in enumerate(batches):
        for r in range(3):
            start = r * n + i * 5
            assert x[r].tolist() == stream[start:start + x.shape[1]].tolist()
            assert y[r].tolist() == stream[start + 1:start + 1 + x.shape[1]].tolist()


def test_sorted_batches_padding_and_model_ignores_padding():
    torch.manual_seed(0)
    docs = [torch.randint(2, 40, (n,)) for n in (5, 12, 3, 9, 7, 11)]
    dl = SortedTextLoader(docs, labels=[0, 1, 0, 1, 0, 1], bs=3)
    (x1, y1), (x2, y2) = list(dl)
    assert x1.shape == (3, 12) and x2.shape == (3, 7)
    assert (x2[2, 5:] == 1).all()                                   # padding at the end
    model = get_text_classifier(40, 2, SMALL_CONFIG).eval()
    with torch.no_grad():
        batched = model(x1)
        alone = torch.cat([model(docs[i][None]) for i in (1, 5, 3)])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)


def test_concat_pool_oracle():
    out = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    res = masked_concat_pool(out, mask)
    real = out[0, :3]
    torch.testing.assert_close(res[0], torch.cat([real[-1], real.max(0).values, real.mean(0)]))
    torch.testing.assert_close(res[1], torch.cat([out[1, -1], out[1].max(0).values, out[1].mean(0)]))


def test_layer_groups_cover_every_parameter_once():
    for m, split in ((get_language_model(50, SMALL_CONFIG), lm_splitter), (get_text_classifier(50, 3, SMALL_CONFIG), clas_splitter)):
        ids = [id(p) for g in split(m) for p in g]
        assert len(ids) == len(set(ids)) == len(list(m.parameters()))


def test_text_dataloaders_export_and_test_dl():
    toks = [TOK(t) for t in ['Good film.', 'Bad film.', 'Good.', 'Bad!', 'So good.', 'So bad.']]
    vocab = make_vocab(toks, min_freq=1)
    cdls = clas_dataloaders(toks[:4], ['pos', 'neg', 'pos', 'neg'], toks[4:], ['pos', 'neg'], vocab, bs=2)
    empty = pickle.loads(pickle.dumps(cdls.new_empty()))
    (x,), = list(empty.test_dl(['So good.']))
    assert empty.text_block.decode(x[0]) == 'xxbos xxmaj so good .'
    assert empty.vocab == ['neg', 'pos'] and empty.decode_target(torch.tensor(1)) == 'pos'
    ldls = lm_dataloaders(toks, toks[:2], vocab, bs=2, bptt=3)
    x, y = next(iter(ldls.train))
    assert x.shape == (2, 3) and (x[:, 1:] == y[:, :-1]).all()
