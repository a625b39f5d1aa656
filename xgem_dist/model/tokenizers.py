"""The three tokenizers XGeM uses: CLIP's (conditioning), BERT's (Optimus encoder), GPT-2's (Optimus decoder).

Real runs load them from local folders (`save_pretrained` layout of openai/clip-vit-large-patch14,
bert-base-cased and gpt2 with <PAD>/<BOS>/<EOS> added); nothing is downloaded. For the demo and the
tests, `train_small_tokenizers` trains tiny ones on report text with the `tokenizers` library,
with the special-token ids the `tiny` preset expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

GPT2_SPECIALS = ("<PAD>", "<BOS>", "<EOS>")
CLIP_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


@dataclass
class Tokenizers:
    clip: PreTrainedTokenizerFast
    bert: PreTrainedTokenizerFast
    gpt2: PreTrainedTokenizerFast
    clip_max_length: int = 77
    bert_max_length: int = 512
    gpt2_max_length: int = 512

    def save(self, folder: str | Path) -> None:
        for name in ("clip", "bert", "gpt2"):
            getattr(self, name).save_pretrained(Path(folder) / name)


def load_tokenizers(folder: str | Path) -> Tokenizers:
    """From <folder>/{clip,bert,gpt2}, local files only."""
    folder = Path(folder)
    loaded = {}
    for name in ("clip", "bert", "gpt2"):
        if not (folder / name).is_dir():
            raise FileNotFoundError(f"{folder / name}: tokenizer folder missing (expected clip/, bert/, gpt2/)")
        loaded[name] = AutoTokenizer.from_pretrained(folder / name, local_files_only=True)
    return Tokenizers(**loaded)


def _fill_to(tokenizer: Tokenizer, size: int) -> None:
    """Pad the vocabulary with placeholder tokens so that tokens added next get ids size, size+1, ..."""
    missing = size - tokenizer.get_vocab_size()
    if missing < 0:
        raise ValueError(f"trained vocabulary {tokenizer.get_vocab_size()} exceeds {size}")
    tokenizer.add_tokens([f"<unused{i}>" for i in range(missing)])


def train_small_tokenizers(texts: list[str], base_vocab: int = 512) -> Tokenizers:
    """BERT-like WordPiece (cased, ids < base_vocab), GPT-2-like byte BPE with <PAD>,<BOS>,<EOS> at
    base_vocab..+2, CLIP-like lower-cased BPE with start/end at base_vocab-2, base_vocab-1."""
    bert = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    bert.normalizer = normalizers.NFD()
    bert.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bert.train_from_iterator(texts, trainers.WordPieceTrainer(
        vocab_size=base_vocab, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], show_progress=False))
    bert.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", bert.token_to_id("[CLS]")), ("[SEP]", bert.token_to_id("[SEP]"))])
    bert.decoder = decoders.WordPiece()

    gpt2 = Tokenizer(models.BPE())
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2.decoder = decoders.ByteLevel()
    gpt2.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=base_vocab,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    _fill_to(gpt2, base_vocab)
    gpt2.add_special_tokens(list(GPT2_SPECIALS))
    gpt2.post_processor = processors.TemplateProcessing(
        single="<BOS> $A <EOS>", special_tokens=[("<BOS>", base_vocab + 1), ("<EOS>", base_vocab + 2)])

    clip = Tokenizer(models.BPE())
    clip.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    clip.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    clip.decoder = decoders.ByteLevel()
    clip.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=base_vocab - 2,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    _fill_to(clip, base_vocab - 2)
    clip.add_special_tokens(list(CLIP_SPECIALS))
    clip.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", base_vocab - 2), ("<|endoftext|>", base_vocab - 1)])

    return Tokenizers(
        clip=PreTrainedTokenizerFast(tokenizer_object=clip, bos_token=CLIP_SPECIALS[0], eos_token=CLIP_SPECIALS[1],
                                     pad_token=CLIP_SPECIALS[1], model_max_length=77),
        bert=PreTrainedTokenizerFast(tokenizer_object=bert, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                     pad_token="[PAD]", mask_token="[MASK]", model_max_length=512),
        gpt2=PreTrainedTokenizerFast(tokenizer_object=gpt2, pad_token="<PAD>", bos_token="<BOS>",
                                     eos_token="<EOS>", model_max_length=512),
    )
