"""Synthetic, labelled PII sentences from Faker and templates, aligned to WordPiece tokens.

An :class:`Example` is a text with character spans ``(start, end, label)``. :class:`Generator`
fills templates (``templates.py``) with Faker values from several locales, wraps them in
contexts, varies case and punctuation and builds key-value records. ``split="train"`` and
``split="heldout"`` draw from disjoint template sets; use different seeds for the two.
:func:`encode` turns an example into token ids and BIO label ids (every subword of an entity is
labelled: ``B-`` on its first token, ``I-`` on the rest; special tokens are O in training and
skipped in evaluation).
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import json
import random
import re
import string
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import wordfreq
from faker import Faker
from tokenizers import Encoding

try:  # run as `python training/train_pii.py` or imported as `training.data`
    from . import templates as T
except ImportError:
    import templates as T  # type: ignore[no-redef]

ENTITY_TYPES: tuple[str, ...] = (
    "PERSON", "ORG", "LOCATION", "ADDRESS", "EMAIL", "PHONE", "CREDIT_CARD", "IBAN",
    "IP_ADDRESS", "URL", "DATE", "ID_NUMBER",
)
LABELS: tuple[str, ...] = ("O", *(f"{p}-{e}" for e in ENTITY_TYPES for p in ("B", "I")))
LABEL2ID: dict[str, int] = {label: i for i, label in enumerate(LABELS)}
IGNORE = -100

LOCALES: dict[str, str] = {"en_US": "en", "en_GB": "en", "de_DE": "de", "fr_FR": "fr",
                           "es_ES": "es", "it_IT": "it", "nl_NL": "nl"}
# Extra locales used only for names, so that English text also meets names from elsewhere.
NAME_LOCALES: tuple[str, ...] = ("en_IN", "pl_PL", "pt_BR", "tr_TR", "sv_SE", "ja_JP", "zh_CN")
LANG_WEIGHTS: dict[str, float] = {"en": 0.55, "de": 0.1, "fr": 0.09, "es": 0.09, "it": 0.09,
                                  "nl": 0.08}
MONTHS: dict[str, list[str]] = {
    "en": ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"],
    "de": ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September",
           "Oktober", "November", "Dezember"],
    "fr": ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre",
           "octobre", "novembre", "décembre"],
    "es": ["enero", "febrero", "marzo", "abril", "mayo", "junio", "julio", "agosto",
           "septiembre", "octubre", "noviembre", "diciembre"],
    "it": ["gennaio", "febbraio", "marzo", "aprile", "maggio", "giugno", "luglio", "agosto",
           "settembre", "ottobre", "novembre", "dicembre"],
    "nl": ["januari", "februari", "maart", "april", "mei", "juni", "juli", "augustus",
           "september", "oktober", "november", "december"],
}
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
JOBS = ["engineer", "nurse", "teacher", "lawyer", "designer", "accountant", "journalist",
        "developer", "chef", "pilot", "architect", "pharmacist", "consultant", "researcher",
        "sales manager", "data scientist", "electrician", "photographer", "student"]
SLOT_RE = re.compile(r"\{([A-Z_]+)\}")
AFFIXES: tuple[tuple[str, ...], tuple[str, ...]] = (
    ("s", "ed", "ing", "ly", "er", "ers", "ation", "ment", "ness", "able", "ful", "ive", "ity",
     "ist", "al", "ung", "heit", "ment", "ción", "zione", "ingen", "en", "e"),
    ("un", "re", "pre", "dis", "over", "non", "co", "sub", "inter", "mis", "ver", "ge", "in"),
)
LETTERS_RE = re.compile(r"[^\W\d_]{3,}")
NAME_TYPES: tuple[str, ...] = ("PERSON", "ORG", "LOCATION", "ADDRESS")
WORD_RE = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
Span = tuple[int, int, str]


@dataclass
class Example:
    """A text and its entities as character spans ``(start, end, label)``."""

    text: str
    spans: list[Span] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "entities": [list(s) for s in self.spans]},
                          ensure_ascii=False)


def split_pool(pool: Sequence[str], split: str, every: int = 5) -> list[str]:
    """Held-out gets items ``i % every == 2``, train the rest (all items if a side is empty)."""
    held = [x for i, x in enumerate(pool) if i % every == 2]
    train = [x for i, x in enumerate(pool) if i % every != 2]
    chosen = held if split == "heldout" else train
    return chosen or list(pool)


def ascii_fold(text: str) -> str:
    """'Müller-Lüdenscheidt' -> 'muller-ludenscheidt' for email local parts and domains."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9.-]", "", folded.lower())


def group(text: str, sizes: Sequence[int], sep: str) -> str:
    """Split ``text`` into consecutive groups of ``sizes`` (the last takes the rest)."""
    parts, i = [], 0
    for size in sizes:
        if i >= len(text):
            break
        parts.append(text[i:i + size])
        i += size
    if i < len(text):
        parts.append(text[i:])
    return sep.join(parts)


class Values:
    """Faker-backed values for every slot, for one random stream."""

    def __init__(self, rng: random.Random, train: bool = False) -> None:
        self.rng = rng
        # training-only value variants (made-up organisations, long URLs); the held-out stream
        # never takes these branches, so it draws exactly the same values as before
        self.train = train
        self.fakers: dict[str, Faker] = {}
        for loc in (*LOCALES, *NAME_LOCALES):
            fake = Faker(loc)
            fake.seed_instance(rng.randrange(2**31))
            self.fakers[loc] = fake

    # -- people and organisations ---------------------------------------------------------
    def _name_faker(self, locale: str) -> tuple[Faker, bool]:
        if self.rng.random() < 0.12:
            loc = self.rng.choice(NAME_LOCALES)
            return self.fakers[loc], loc in ("ja_JP", "zh_CN")
        return self.fakers[locale], False

    def first(self, locale: str) -> str:
        fake, roman = self._name_faker(locale)
        return fake.first_romanized_name() if roman else fake.first_name()

    def last(self, locale: str) -> str:
        fake, roman = self._name_faker(locale)
        return self.last_name(fake.last_romanized_name() if roman else fake.last_name())

    def last_name(self, last: str) -> str:
        """Training only: 8% of last names are everyday words or start with one ("Doe",
        "Young", "May"; ``EVERYDAY_SURNAMES``), so that the context decides; the held-out
        stream draws nothing here."""
        if self.train and self.rng.random() < 0.08:
            return self.rng.choice(T.EVERYDAY_SURNAMES)
        return last

    def person(self, locale: str) -> str:
        fake, roman = self._name_faker(locale)
        first = fake.first_romanized_name() if roman else fake.first_name()
        last = self.last_name(fake.last_romanized_name() if roman else fake.last_name())
        r = self.rng.random()
        if r < 0.08:
            return f"{first} {self.rng.choice(string.ascii_uppercase)}. {last}"
        if r < 0.14 and not roman:
            return f"{first} {fake.first_name()} {last}"
        if r < 0.2 and locale == "es_ES":
            return f"{first} {last} {fake.last_name()}"
        if r < 0.23:
            return f"{first[0]}. {last}"
        return f"{first} {last}"

    def org(self, locale: str) -> str:
        if self.train and self.rng.random() < 0.3:
            return self.made_up_org(locale)
        if self.rng.random() < 0.45:
            return self.rng.choice(T.REAL_ORGS)
        return self.fakers[locale].company()

    def made_up_org(self, locale: str) -> str:
        """Training only: organisation names that are not made of surnames (brand words,
        industries, legal forms, acronyms, institutions named after places)."""
        rng, lang = self.rng, LOCALES[locale]
        word = rng.choice(lexicon(lang if rng.random() < 0.5 else "en")).capitalize()
        brand = rng.choice((word, word + rng.choice(T.BRAND_ENDINGS),
                            rng.choice(T.BRAND_STARTS) + rng.choice(T.BRAND_ENDINGS).lower(),
                            "".join(rng.choice(string.ascii_uppercase)
                                    for _ in range(rng.randint(2, 4)))))
        industry = rng.choice(T.ORG_INDUSTRIES[lang] + T.ORG_INDUSTRIES["en"])
        suffix = rng.choice(T.ORG_SUFFIXES)
        r = rng.random()
        if r < 0.3:
            return f"{brand} {industry} {suffix}"
        if r < 0.5:
            return f"{brand} {industry}"
        if r < 0.65:
            return f"{brand} {suffix}"
        if r < 0.8:
            return rng.choice(T.ORG_INSTITUTIONS[lang]).format(
                CITY=self.city(locale), X=word, LAST=self.fakers[locale].last_name())
        if r < 0.9:
            return f"{self.fakers[locale].last_name()} & {rng.choice((word, industry))}"
        return brand

    # -- places ---------------------------------------------------------------------------
    def city(self, locale: str) -> str:
        if self.rng.random() < 0.6:
            return self.rng.choice(T.REAL_CITIES)
        return self.fakers[locale].city()

    def country(self, locale: str) -> str:
        return self.fakers[locale].country()

    def region(self, locale: str) -> str:
        if self.rng.random() < 0.4:
            return self.rng.choice(T.REAL_REGIONS)
        return self.fakers[locale].administrative_unit()

    def location(self, locale: str) -> str:
        return self.rng.choice((self.city, self.city, self.country, self.region))(locale)

    def street(self, locale: str) -> str:
        return self.fakers[locale].street_address()

    def address(self, locale: str) -> str:
        text = self.fakers[locale].address()
        return text.replace("\n", self.rng.choice((", ", ", ", " ", "\n")))

    # -- contact and online -----------------------------------------------------------------
    def email(self, locale: str) -> str:
        fake = self.fakers[locale]
        if self.train and self.rng.random() < 0.3:
            return f"{self.local_part(locale)}@{self.web_domain(locale)}"
        r = self.rng.random()
        if r < 0.3:
            return fake.free_email()
        if r < 0.5:
            return fake.company_email()
        if r < 0.65:
            return fake.email()
        return f"{self.local_part(locale)}@{fake.domain_name()}"

    def local_part(self, locale: str) -> str:
        fake = self.fakers[locale]
        first, last = ascii_fold(fake.first_name()), ascii_fold(fake.last_name())
        return self.rng.choice((f"{first}.{last}", f"{first[:1]}{last}", f"{first}_{last}",
                                f"{first}{self.rng.randrange(100)}", f"{last}.{first}",
                                "info", "support", "hr", "contact", "billing"))

    def web_domain(self, locale: str) -> str:
        """Training only: domains Faker does not make: brand words, hyphenated company names
        with a legal form ("dehaan-bv.nl"), prefixed product names ("getfinch.app") and newer
        top-level domains, so that a dot or hyphen inside an address reads as part of it."""
        rng, fake = self.rng, self.fakers[locale]
        word = ascii_fold(rng.choice(lexicon(LOCALES[locale] if rng.random() < 0.5 else "en")))
        word = word.strip(".-") or "web"
        last = ascii_fold(fake.last_name()).strip(".-").replace(".", "") or word
        legal = ascii_fold(rng.choice(T.ORG_SUFFIXES)).replace(".", "") or "group"
        name = rng.choice((word, word + rng.choice(T.BRAND_ENDINGS), f"{last}-{legal}",
                           f"{word}-{ascii_fold(rng.choice(T.BRAND_STARTS))}",
                           f"{rng.choice(T.DOMAIN_PREFIXES)}{word}", f"{last}{legal}",
                           f"{word}{rng.randrange(2, 100)}"))
        return f"{name}.{rng.choice(T.TOP_LEVEL_DOMAINS)}"

    def phone(self, locale: str) -> str:
        if self.rng.random() < 0.75:
            number = self.fakers[locale].phone_number()
            return re.sub(r"x\d+$", "", number) if self.rng.random() < 0.7 else number
        d = "".join(self.rng.choice(string.digits) for _ in range(10))
        return self.rng.choice((
            f"({d[:3]}) {d[3:6]}-{d[6:]}", f"+1 {d[:3]} {d[3:6]} {d[6:]}",
            f"{d[:3]}.{d[3:6]}.{d[6:]}",
            f"+44 {d[1:5]} {d[5:]}", f"+49 {d[1:4]} {d[4:]}", f"0{d[1:4]}/{d[4:]}",
            f"+33 {group(d[1:], [1, 2, 2, 2, 2], ' ')}", f"+39 {d[:3]} {d[3:]}",
            f"+34 {d[1:4]} {d[4:7]} {d[7:]}", f"+31 6 {d[2:]}", f"0{d[1:3]}-{d[3:]}",
        ))

    def url(self, locale: str) -> str:
        if self.train and self.rng.random() < 0.4:
            return self.long_url(locale)
        if self.train and self.rng.random() < 0.2:
            return self.profile_url(locale)
        fake = self.fakers[locale]
        r = self.rng.random()
        if r < 0.3:
            return fake.url()
        if r < 0.55:
            return fake.uri()
        if r < 0.7:
            return f"www.{fake.domain_name()}"
        if r < 0.8:
            return fake.domain_name()
        path = "/".join(fake.words(self.rng.randint(1, 3)))
        query = f"?id={self.rng.randrange(10**5)}" if self.rng.random() < 0.3 else ""
        scheme = self.rng.choice(("https://", "http://", "https://www."))
        return f"{scheme}{fake.domain_name()}/{ascii_fold(path)}{query}"

    def long_url(self, locale: str) -> str:
        """Training only: URLs with multi-segment paths (slugs, versions, numbers, file names),
        queries and fragments, so that a slash inside a URL reads as part of it while a
        spaced " / " between fields is a separator."""
        fake, rng = self.fakers[locale], self.rng
        host = self.web_domain(locale) if rng.random() < 0.3 else fake.domain_name()
        r = rng.random()
        if r < 0.25:
            host = f"www.{host}"
        elif r < 0.45:
            host = f"{rng.choice(T.URL_SUBDOMAINS)}.{host}"
        segments = []
        for _ in range(rng.choice((1, 2, 2, 3, 3, 4))):
            words = [ascii_fold(w) for w in fake.words(rng.randint(1, 3))]
            segments.append(rng.choice((
                words[0], "-".join(words), "_".join(words), f"v{rng.randint(1, 4)}",
                str(rng.randrange(10**rng.randint(1, 7))), rng.choice(T.URL_SEGMENTS),
                f"{words[0]}.{rng.choice(('html', 'pdf', 'php', 'aspx', 'png', 'json'))}",
                f"@{words[0]}{rng.randrange(100)}", f"{rng.randint(2015, 2025)}")))
        path = "/".join(s for s in segments if s)
        if rng.random() < 0.15:
            path += "/"
        r = rng.random()
        if r < 0.15:
            path += f"?{rng.choice(('id', 'q', 'page', 'ref', 'lang'))}={rng.randrange(10**4)}"
        elif r < 0.22:
            path += f"?utm_source={ascii_fold(fake.word())}&utm_medium=email"
        elif r < 0.3:
            path += f"#{ascii_fold(fake.word())}"
        scheme = rng.choice(("https://", "https://", "http://", ""))
        return f"{scheme}{host}/{path}"

    def profile_url(self, locale: str) -> str:
        """Training only: profiles and repositories on code hosts and social networks, whose
        user handles mix letters and digits ("github.com/jdoe42")."""
        rng, fake = self.rng, self.fakers[locale]
        first, last = ascii_fold(fake.first_name()), ascii_fold(fake.last_name())
        handle = rng.choice((f"{first[:1]}{last}{rng.randrange(100)}", f"{first}{last}",
                             f"{first}-{last}", f"{first}_{last}{rng.randrange(10, 100)}",
                             f"{last}{rng.randrange(1960, 2010)}", f"{first}.{last}"))
        host = rng.choice(T.PROFILE_HOSTS)
        path = host.format(handle=handle, repo="-".join(
            ascii_fold(w) for w in fake.words(rng.randint(1, 2))))
        return rng.choice(("https://", "https://", "", "", "www.", "http://")) + path

    def ip(self, locale: str) -> str:
        fake = self.fakers[locale]
        r = self.rng.random()
        if r < 0.45:
            return fake.ipv4_public()
        if r < 0.75:
            return fake.ipv4_private()
        value = fake.ipv6()
        return str(ipaddress.IPv6Address(value)) if self.rng.random() < 0.5 else value

    # -- money and identity -----------------------------------------------------------------
    def card(self, locale: str) -> str:
        number = self.fakers[locale].credit_card_number()
        sizes = [4, 6, 5] if len(number) == 15 else [4, 4, 4, 4]
        return self.rng.choice((number, group(number, sizes, " "), group(number, sizes, "-")))

    def iban(self, locale: str) -> str:
        fake = self.fakers[locale if self.rng.random() < 0.8 else self.rng.choice(list(LOCALES))]
        value = fake.iban()
        return group(value, [4] * 9, " ") if self.rng.random() < 0.5 else value

    def bic(self, locale: str) -> str:
        return self.fakers[locale].swift()

    def ssn(self, locale: str) -> str:
        fake, rng = self.fakers[locale], self.rng
        digits = "".join(rng.choice(string.digits) for _ in range(11))
        if locale == "de_DE":
            return rng.choice((digits, group(digits, [2, 3, 3, 3], " ")))
        if locale == "es_ES":
            return rng.choice((fake.nif, fake.nie))()
        if locale == "en_GB" and rng.random() < 0.4:  # NHS number
            return group(digits[:10], [3, 3, 4], " ")
        return fake.ssn()

    def passport(self, locale: str) -> str:
        if self.rng.random() < 0.7:
            return self.fakers[locale].passport_number()
        letters = "".join(self.rng.choice(string.ascii_uppercase) for _ in range(2))
        return f"{letters}{self.rng.randrange(10**6, 10**7)}"

    def license(self, locale: str) -> str:
        rng = self.rng
        d = "".join(rng.choice(string.digits) for _ in range(12))
        letters = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        return rng.choice((f"{letters[0]}{d[:7]}", f"{letters[0]}{d[:3]}-{d[3:7]}-{d[7:11]}",
                           f"{letters}{d[:6]}{letters[:2]}9{letters[2:4]}",
                           f"{letters[0]}{d[:2]}{letters[1:3]}{d[2:7]}"))

    def empid(self, locale: str) -> str:
        rng, n = self.rng, self.rng.randrange(10**3, 10**7)
        return rng.choice((f"EMP-{n:06d}", f"E{n}", f"C-{rng.randint(2015, 2025)}-{n % 10**4}",
                           f"CUST{n}", str(n), f"{rng.choice(string.ascii_uppercase)}{n:07d}",
                           f"ID-{n}", f"M{n:08d}"))

    def patient(self, locale: str) -> str:
        n = self.rng.randrange(10**5, 10**9)
        return self.rng.choice((str(n), f"{n:09d}", f"PT-{n}", f"H{n}"))

    def idnum(self, locale: str) -> str:
        fns = (self.ssn, self.ssn, self.passport, self.license, self.empid, self.patient)
        return self.rng.choice(fns)(locale)

    # -- dates ----------------------------------------------------------------------------
    def _date(self) -> date:
        return date(1940, 1, 1) + timedelta(days=self.rng.randrange(365 * 90))

    def date(self, locale: str) -> str:
        lang, d, rng = LOCALES[locale], self._date(), self.rng
        month = MONTHS[lang][d.month - 1]
        numeric = [f"{d:%Y-%m-%d}", f"{d.day}/{d.month}/{d.year}", f"{d:%d/%m/%Y}",
                   f"{d:%d.%m.%Y}", f"{d:%d-%m-%Y}", f"{d:%d.%m.%y}"]
        if locale == "en_US":
            numeric += [f"{d:%m/%d/%Y}", f"{d.month}/{d.day}/{d.year}", f"{d:%m/%d/%y}"]
        if rng.random() < 0.4:
            return rng.choice(numeric)
        words = {
            "en": [f"{month} {d.day}, {d.year}", f"{d.day} {month} {d.year}",
                   f"{d.day}{ordinal(d.day)} {month} {d.year}", f"{month[:3]} {d.day}, {d.year}",
                   f"{month} {d.day}{ordinal(d.day)}", f"{d.day} {month}",
                   f"{d.day} {month[:3]} {d.year}", f"{month[:3]}. {d.day}, {d.year}"],
            "de": [f"{d.day}. {month} {d.year}", f"{d.day}. {month}",
                   f"{d.day}.{d.month}.{d.year}"],
            "fr": [f"{d.day if d.day > 1 else '1er'} {month} {d.year}", f"{d.day} {month}"],
            "es": [f"{d.day} de {month} de {d.year}", f"{d.day} de {month}"],
            "it": [f"{d.day} {month} {d.year}", f"{d.day} {month}"],
            "nl": [f"{d.day} {month} {d.year}", f"{d.day} {month}"],
        }[lang]
        return rng.choice(words)

    def monthyear(self, locale: str) -> str:
        lang, d = LOCALES[locale], self._date()
        month = MONTHS[lang][d.month - 1]
        return f"{month} de {d.year}" if lang == "es" else f"{month} {d.year}"

    # -- non-entities -----------------------------------------------------------------------
    def num(self, locale: str) -> str:
        return str(self.rng.choice((self.rng.randint(1, 20), self.rng.randint(1, 5000))))

    def amount(self, locale: str) -> str:
        rng = self.rng
        value = rng.choice((rng.randint(1, 200), rng.randint(1, 20000))) + rng.randrange(100) / 100
        return rng.choice((f"${value:,.2f}", f"€{value:,.2f}", f"{value:.2f} €", f"£{value:.0f}",
                           f"{value:.0f} EUR", f"CHF {value:.2f}", f"USD {value:,.0f}",
                           f"{value:,.2f} €".replace(",", " ").replace(".", ",")))

    def time(self, locale: str) -> str:
        h, m = self.rng.randint(0, 23), self.rng.choice((0, 15, 30, 45, 5, 50))
        h12 = h % 12 or 12
        return self.rng.choice((f"{h:02d}:{m:02d}", f"{h12}pm", f"{h12}:{m:02d} am", f"{h}:{m:02d}",
                                f"{h12} PM"))

    def order(self, locale: str) -> str:
        rng, n = self.rng, self.rng.randrange(10**4, 10**8)
        return rng.choice((f"#{n}", f"ORD-{rng.randint(2018, 2025)}-{n % 10**5:05d}", f"A-{n}",
                           f"INV-{n}", f"{rng.choice(string.ascii_uppercase)}{n}", f"TKT{n}",
                           f"1Z{n}{n % 997}", f"SR{n}", f"PO {n}"))

    def version(self, locale: str) -> str:
        rng = self.rng
        return rng.choice((f"{rng.randint(0, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}",
                           f"v{rng.randint(1, 9)}.{rng.randint(0, 12)}",
                           f"{rng.randint(1, 12)}.{rng.randint(1, 9)}"))

    def job(self, locale: str) -> str:
        return self.rng.choice(JOBS)

    def weekday(self, locale: str) -> str:
        return self.rng.choice(WEEKDAYS)


@functools.cache
def entity_words() -> frozenset[str]:
    """Lower-cased one-word names, places and organisations of the lists the generator draws
    from (words of longer names such as "New York" stay common words)."""
    texts: list[str] = [*T.REAL_CITIES, *T.REAL_REGIONS, *T.REAL_ORGS]
    for loc in (*LOCALES, *NAME_LOCALES):
        person = importlib.import_module(f"faker.providers.person.{loc}").Provider
        for attr in ("first_names", "first_names_male", "first_names_female", "last_names"):
            texts += list(getattr(person, attr, ()))
    for loc in LOCALES:
        address = importlib.import_module(f"faker.providers.address.{loc}").Provider
        for attr in ("cities", "countries", "states"):
            texts += list(getattr(address, attr, ()))
    return frozenset(text.lower() for text in texts if WORD_RE.fullmatch(text))


@functools.cache
def lexicon(lang: str, size: int = 8000) -> tuple[str, ...]:
    """Common words of a language, most frequent first: the ``size`` most frequent words of
    ``wordfreq`` (English adds Faker's business and job words), without words of the
    generator's names, places and organisations and without international words (a random
    context word labelled O must not be a name the model has to tag)."""
    words = list(wordfreq.top_n_list(lang, size))
    if lang == "en":
        company = importlib.import_module("faker.providers.company.en_US").Provider
        jobs = importlib.import_module("faker.providers.job.en_US").Provider.jobs
        extra = [w for group in (*company.bsWords, *company.catch_phrase_words) for w in group]
        words += [w for text in (*extra, *jobs) for w in WORD_RE.findall(text)]
    banned = entity_words() | international_words()
    return tuple(dict.fromkeys(w for w in words
                               if WORD_RE.fullmatch(w) and w.lower() not in banned))


@functools.cache
def international_words(size: int = 8000, languages: int = 4) -> frozenset[str]:
    """Words among the ``size`` most frequent of at least ``languages`` of the six languages:
    mostly names, places and brands ("obama", "google", "london"), which must not be context
    words labelled O (frequent everyday words are in the templates anyway)."""
    counts: dict[str, int] = {}
    for lang in LANG_WEIGHTS:
        for word in wordfreq.top_n_list(lang, size):
            counts[word] = counts.get(word, 0) + 1
    return frozenset(w for w, n in counts.items() if n >= languages)


def common_text(word_repeat: int = 3, template_repeat: int = 3) -> list[str]:
    """Common words (lower-case and capitalised) and the train templates' and record keys' text,
    for tokenizer training: subword pieces for everyday words too, not only for names."""
    words = [w for lang in LANG_WEIGHTS for w in lexicon(lang)]
    lines = [" ".join(words), " ".join(w.capitalize() for w in words)] * word_repeat
    split_pools = (T.TEMPLATES, T.NO_ENTITY, T.PREFIXES, T.SUFFIXES)
    texts = [t for pool in split_pools for pool_texts in pool.values()
             for t in split_pool(pool_texts, "train")]
    texts += [t for pool in (T.GREETINGS, T.SIGNOFFS) for pool_texts in pool.values()
              for t in pool_texts]
    texts = [SLOT_RE.sub(" ", t) for t in texts]
    texts += [key for fields in T.FORM_KEYS.values() for keys in fields.values()
              for key in split_pool(keys, "train", every=3)]
    return lines + texts * template_repeat


def common_words(per_language: int) -> list[str]:
    """The ``per_language`` most frequent words of each language, lower-case and capitalised:
    candidate whole vocabulary entries, so that everyday words are single tokens instead of
    name-like subword pieces. Words that are also names ("who", "room", "de") are kept: an entry
    only decides how a word is split, not how it is labelled."""
    out: dict[str, None] = {}
    for lang in LANG_WEIGHTS:
        top = [w for w in wordfreq.top_n_list(lang, per_language) if WORD_RE.fullmatch(w)]
        out.update(dict.fromkeys(w for word in top for w in (word, word.capitalize())))
    return list(out)


def ordinal(day: int) -> str:
    if day in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


# slot name -> (entity label or None, Values method name)
SLOTS: dict[str, tuple[str | None, str]] = {
    "PERSON": ("PERSON", "person"), "FIRST": ("PERSON", "first"), "LAST": ("PERSON", "last"),
    "ORG": ("ORG", "org"), "CITY": ("LOCATION", "city"), "COUNTRY": ("LOCATION", "country"),
    "REGION": ("LOCATION", "region"), "STREET": ("ADDRESS", "street"),
    "ADDRESS": ("ADDRESS", "address"), "EMAIL": ("EMAIL", "email"), "PHONE": ("PHONE", "phone"),
    "CARD": ("CREDIT_CARD", "card"), "IBAN": ("IBAN", "iban"), "IP": ("IP_ADDRESS", "ip"),
    "URL": ("URL", "url"), "DATE": ("DATE", "date"), "MONTHYEAR": ("DATE", "monthyear"),
    "SSN": ("ID_NUMBER", "ssn"), "PASSPORT": ("ID_NUMBER", "passport"),
    "IDNUM": ("ID_NUMBER", "idnum"), "EMPID": ("ID_NUMBER", "empid"),
    "PATIENT": ("ID_NUMBER", "patient"), "LICENSE": ("ID_NUMBER", "license"),
    "NUM": (None, "num"), "AMOUNT": (None, "amount"), "TIME": (None, "time"),
    "ORDER": (None, "order"), "VERSION": (None, "version"), "JOB": (None, "job"),
    "WEEKDAY": (None, "weekday"), "BIC": (None, "bic"),
}
# record field (entity) -> slot that fills it
FIELD_SLOTS: dict[str, tuple[str, ...]] = {
    "PERSON": ("PERSON",), "EMAIL": ("EMAIL",), "PHONE": ("PHONE",),
    "ADDRESS": ("ADDRESS", "STREET"), "DATE": ("DATE",), "IBAN": ("IBAN",),
    "CREDIT_CARD": ("CARD",), "ID_NUMBER": ("SSN", "PASSPORT", "IDNUM"), "IP_ADDRESS": ("IP",),
    "URL": ("URL",), "ORG": ("ORG",), "LOCATION": ("CITY", "COUNTRY"),
}
NAME_SLOTS: tuple[str, ...] = ("PERSON", "FIRST", "LAST", "ORG", "CITY", "COUNTRY", "REGION")
ENTITY_SLOTS: tuple[str, ...] = tuple(name for name, (label, _) in SLOTS.items() if label)
PLAIN_SLOTS: tuple[str, ...] = ("ORDER", "VERSION", "BIC", "AMOUNT", "TIME", "NUM")
PLAIN_FIELDS: list[tuple[str, str]] = [("Order", "ORDER"), ("Amount", "AMOUNT"), ("Qty", "NUM"),
                                       ("Time", "TIME"), ("Ref", "ORDER"), ("Total", "AMOUNT")]
Piece = tuple[str, "str | None"]


class Generator:
    """Deterministic stream of labelled examples for one split."""

    def __init__(self, split: str, seed: int, case_rate: float = 0.0,
                 lead_rate: float = 0.0, word_opener_rate: float = 0.0,
                 swap_rate: float = 0.12, noise_rate: float = 0.2) -> None:
        assert split in ("train", "heldout"), split
        self.split = split
        # Training only (same draws at any value): share of name-like slots filled with another
        # name-like type, and share of context words swapped for everyday words in the noisy
        # examples (defaults: the stream of earlier runs).
        self.swap_rate, self.noise_rate = swap_rate, noise_rate
        # Training only: share of examples opened by a capitalised everyday word and a colon,
        # comma or dash ("Budget:", "Morgen,"), labelled O (0: the stream of earlier runs).
        self.word_opener_rate = word_opener_rate if split == "train" else 0.0
        # Training only: share of examples cut to start at their first entity ("Jane Doe works
        # at ..."; 0: the stream of earlier runs).
        self.lead_rate = lead_rate if split == "train" else 0.0
        # Training only: share of examples that get an extra all-lower-case (2/3) or ALL-CAPS
        # (1/3) variant on top of the shared 7% / 2% (0: the stream of earlier runs).
        self.case_rate = case_rate if split == "train" else 0.0
        self.rng = random.Random(seed)
        self.values = Values(self.rng, train=split == "train")
        pick = lambda pools: {k: split_pool(v, split) for k, v in pools.items()}  # noqa: E731
        self.templates = pick(T.TEMPLATES)
        self.no_entity = pick(T.NO_ENTITY)
        self.prefixes = pick(T.PREFIXES)
        self.suffixes = pick(T.SUFFIXES)
        self.layouts = split_pool(T.FORM_LAYOUTS, split)
        if split == "train":
            held = set(split_pool(T.FORM_LAYOUTS, "heldout"))
            self.layouts += [(kv, sep) for kv in T.TRAIN_KV_SEPARATORS
                             for sep in (*T.TRAIN_FIELD_SEPARATORS, *T.TRAIN_SYMBOL_SEPARATORS)
                             if (kv, sep) not in held]
        self.form_keys = {lang: {f: split_pool(keys, split, every=3) for f, keys in d.items()}
                          for lang, d in T.FORM_KEYS.items()}

    def __iter__(self) -> Iterator[Example]:
        while True:
            yield self.example()

    def take(self, n: int, doc_rate: float = 0.0) -> list[Example]:
        """``n`` examples; a share ``doc_rate`` of them are multi-sentence documents."""
        return [self.document() if self.rng.random() < doc_rate else self.example()
                for _ in range(n)]

    def document(self) -> Example:
        """3-10 examples joined by spaces or line breaks: long inputs for later positions."""
        parts = [self.example() for _ in range(self.rng.randint(3, 10))]
        text, spans = "", []
        for i, part in enumerate(parts):
            if i:
                text += self.rng.choice((" ", "\n", "\n\n"))
            spans += [(s + len(text), e + len(text), label) for s, e, label in part.spans]
            text += part.text
        return Example(text, spans)

    # -- assembling ---------------------------------------------------------------------------
    def example(self) -> Example:
        rng = self.rng
        lang = rng.choices(list(LANG_WEIGHTS), weights=list(LANG_WEIGHTS.values()))[0]
        locale = self.locale_for(lang)
        r = rng.random()
        if r < 0.12:
            pieces = self.record(lang, locale)
        elif r < 0.22:
            pieces = self.fill(rng.choice(self.no_entity[lang]), locale)
        elif r < 0.26:
            pieces = self.babble(locale)
        elif r < 0.38 and self.split == "train":
            pieces = self.salad(lang, locale)
        elif r < 0.5 and self.split == "train":
            pieces = self.compose(lang)
        elif r < 0.58 and self.split == "train":
            pieces = self.listing(lang, locale)
        else:
            pieces = self.fill(rng.choice(self.templates[lang]), locale)
        if rng.random() < 0.15:  # a second sentence
            more = self.fill(rng.choice(self.templates[lang] + self.no_entity[lang]),
                             self.locale_for(lang))
            pieces = [*pieces, (rng.choice((" ", " ", "\n", "  ")), None), *more]
        if self.lead_rate and rng.random() < self.lead_rate:
            first = next((i for i, (_, label) in enumerate(pieces) if label), 0)
            pieces = pieces[first:]
        pieces = self.wrap(pieces, lang)
        if self.split == "train" and rng.random() < 0.6:
            pieces = self.noise(pieces, lang)
        return assemble(self.vary(pieces))

    def locale_for(self, lang: str) -> str:
        own = [loc for loc, lg in LOCALES.items() if lg == lang]
        if lang == "en" or self.rng.random() < 0.3:
            return self.rng.choice(own + list(LOCALES))
        return self.rng.choice(own)

    def fill(self, template: str, locale: str) -> list[Piece]:
        """Template text -> pieces ``(text, label)``; slot values carry their entity label."""
        pieces: list[Piece] = []
        pos = 0
        for match in SLOT_RE.finditer(template):
            pieces.append((template[pos:match.start()], None))
            slot = match.group(1)
            if self.split == "train":
                slot = self.swap(slot)
            label, method = SLOTS[slot]
            value = getattr(self.values, method)(locale)
            if self.split == "train" and label and self.rng.random() < 0.05:
                left, right = self.rng.choice(T.WRAPPERS)
                pieces += [(left, None), (value, label), (right, None)]
            else:
                pieces.append((value, label))
            pos = match.end()
        pieces.append((template[pos:], None))
        return [p for p in pieces if p[0]]

    def swap(self, slot: str) -> str:
        """Training only: sometimes fill a slot with another entity type (names, places and
        organisations among themselves, rarely any type), so that the context of a template
        does not decide the type on its own and the value has to be read."""
        rng, r = self.rng, self.rng.random()
        if slot in NAME_SLOTS and r < self.swap_rate:
            return rng.choice(NAME_SLOTS)
        if SLOTS[slot][0] and r > 0.97:
            return rng.choice(ENTITY_SLOTS)
        return slot

    def listing(self, lang: str, locale: str) -> list[Piece]:
        """Training only: tables (header line, rows of values), lists of values after a key
        (comma, "and", bullets, numbered lines) and inline "key value" pairs in word salad."""
        rng, keys = self.rng, self.form_keys[lang]
        r = rng.random()
        if r < 0.35:  # table: a header line of field keys, then 1-3 rows of values
            fields = rng.sample(list(keys), rng.randint(2, 4))
            sep = rng.choice(T.TABLE_SEPARATORS)
            edge = sep.strip() if sep.strip() and rng.random() < 0.4 else ""
            def line(cells: list[Piece]) -> list[Piece]:
                out: list[Piece] = [(edge + " " if edge else "", None)]
                for i, cell in enumerate(cells):
                    out += [(sep if i else "", None), cell]
                return [*out, (" " + edge if edge else "", None)]
            pieces = line([(rng.choice(keys[f]), None) for f in fields])
            for _ in range(rng.randint(1, 3)):
                cells = []
                for f in fields:
                    label, method = SLOTS[rng.choice(FIELD_SLOTS[f])]
                    cells.append((getattr(self.values, method)(locale), label))
                pieces += [("\n", None), *line(cells)]
            return [p for p in pieces if p[0]]
        if r < 0.75:  # a key, then a list of values of one field
            field_name = rng.choice(list(keys))
            key = rng.choice(keys[field_name])
            joiner = rng.choice(T.LIST_JOINERS)
            n = rng.randint(2, 4)
            pieces = [(key + rng.choice((": ", ":\n", " ", " - ", ":\n- ")), None)]
            for i in range(n):
                label, method = SLOTS[rng.choice(FIELD_SLOTS[field_name])]
                if i:
                    last = i == n - 1 and joiner == ", "
                    pieces.append((rng.choice(T.AND[lang]) if last else joiner, None))
                pieces.append((getattr(self.values, method)(locale), label))
            return pieces
        # inline "key value" pairs between everyday words
        pieces = []
        for _ in range(rng.randint(1, 3)):
            words = " ".join(self.random_word(lang) for _ in range(rng.randint(0, 5)))
            field_name = rng.choice(list(keys))
            key = rng.choice(keys[field_name])
            key = key.lower() if rng.random() < 0.5 else key
            label, method = SLOTS[rng.choice(FIELD_SLOTS[field_name])]
            pieces += [((words + " " if words else "") + key + rng.choice((" ", ": ", " is ")),
                        None), (getattr(self.values, method)(locale), label),
                       (rng.choice((" ", ", ", "; ", ". ")), None)]
        return pieces

    def compose(self, lang: str) -> list[Piece]:
        """One to three training clauses joined by connectors, each filled from its own locale;
        clauses that start a sentence are capitalised."""
        rng = self.rng
        pieces: list[Piece] = []
        starts_sentence = True
        for i in range(rng.choice((1, 2, 2, 3))):
            if i:
                connector = rng.choice(T.CONNECTORS[lang])
                pieces.append((connector, None))
                starts_sentence = connector.endswith(". ")
            clause = self.fill(rng.choice(T.CLAUSES[lang]), self.locale_for(lang))
            if starts_sentence and clause[0][1] is None:
                clause[0] = (clause[0][0][:1].upper() + clause[0][0][1:], None)
            pieces += clause
        return [*pieces, (rng.choice((".", ".", "!", "", "?")), None)]

    def record(self, lang: str, locale: str) -> list[Piece]:
        """A key-value record (form, CSV-ish line or JSON object) of 2-6 fields."""
        rng, keys = self.rng, self.form_keys[lang]
        fields = rng.sample(list(keys), rng.randint(2, 6))
        items: list[tuple[str, str, str | None]] = []
        for name in fields:
            label, method = SLOTS[rng.choice(FIELD_SLOTS[name])]
            items.append((rng.choice(keys[name]), getattr(self.values, method)(locale), label))
        if rng.random() < 0.3:
            key, slot = rng.choice(PLAIN_FIELDS)
            items.insert(rng.randrange(len(items) + 1),
                         (key, getattr(self.values, SLOTS[slot][1])(locale), None))
        if rng.random() < 0.15:  # JSON-like
            pieces: list[Piece] = [("{", None)]
            for i, (key, value, label) in enumerate(items):
                sep = ", " if i else ""
                pieces += [(f'{sep}"{key.lower().replace(" ", "_")}": "', None), (value, label),
                           ('"', None)]
            return [*pieces, ("}", None)]
        kv, between = rng.choice(self.layouts)
        pieces = []
        for i, (key, value, label) in enumerate(items):
            pieces += [((between if i else "") + key + kv, None), (value, label)]
        return pieces

    def babble(self, locale: str) -> list[Piece]:
        """Faker word salad in the locale's language: common words, no entities."""
        fake = self.values.fakers["en_US" if locale == "en_GB" else locale]
        return [(fake.sentence(nb_words=self.rng.randint(4, 14)), None)]

    def random_word(self, lang: str) -> str:
        """A common word, often derived (affix, compound, typo) so that it splits into subwords:
        natural text is full of rare words, and their pieces must read as O too."""
        rng = self.rng
        words = lexicon(lang if rng.random() < 0.8 else "en")
        word, r = rng.choice(words), rng.random()
        if r < 0.2:
            word += rng.choice(AFFIXES[0])
        elif r < 0.3:
            word = rng.choice(AFFIXES[1]) + word
        elif r < 0.45:
            word += rng.choice(words).lower()
        elif r < 0.5 and len(word) > 3:
            i = rng.randrange(len(word) - 1)
            word = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        return word

    def salad(self, lang: str, locale: str) -> list[Piece]:
        """Random common words with 1-3 entity values and 0-2 look-alike values that are not
        entities (order and version numbers, BICs, amounts, times) dropped in: teaches value
        shapes."""
        rng = self.rng
        words = [self.random_word(lang) for _ in range(rng.randint(3, 16))]
        if rng.random() < 0.7:
            words[0] = words[0].capitalize()
        pieces: list[Piece] = [(" ".join(words), None)]
        slots = [*(rng.choice(ENTITY_SLOTS) for _ in range(rng.randint(1, 3))),
                 *(rng.choice(PLAIN_SLOTS) for _ in range(rng.choice((0, 0, 1, 2))))]
        for slot in slots:
            label, method = SLOTS[slot]
            at = rng.randrange(len(pieces) + 1)
            pieces.insert(at, (getattr(self.values, method)(locale), label))
        out: list[Piece] = []
        for i, piece in enumerate(pieces):  # spaces (or a comma/colon) between pieces
            if i:
                out.append((rng.choice((" ", " ", " ", ", ", ": ", " (", " / ", " | ", "; ",
                                        " - ", "), ", ". ")), None))
            out.append(piece)
        return out + [(rng.choice((".", ".", "", "!", "?", ")", " /", ";", ":", "...")), None)]

    def noise(self, pieces: list[Piece], lang: str) -> list[Piece]:
        """Replace a share ``noise_rate`` (20%) of the context words by random common words
        (case kept)."""
        def swap(match: re.Match[str]) -> str:
            word = match.group(0)
            if self.rng.random() >= self.noise_rate:
                return word
            new = self.random_word(lang)
            if word.isupper() and len(word) > 1:
                return new.upper()
            return new.capitalize() if word[0].isupper() else new.lower()

        pieces = [(WORD_RE.sub(swap, text) if label is None else text, label)
                  for text, label in pieces]
        if self.rng.random() < 0.15:  # an unknown capitalised word in front
            pieces.insert(0, (self.random_word(lang).capitalize() + " ", None))
        return pieces

    def wrap(self, pieces: list[Piece], lang: str) -> list[Piece]:
        """Openers and closers; in training also greetings and sign-offs with a name."""
        rng = self.rng
        if rng.random() < 0.15:
            pieces = [(rng.choice(self.prefixes[lang]) + " ", None), *pieces]
        if rng.random() < 0.1:
            pieces = [*pieces, (" " + rng.choice(self.suffixes[lang]), None)]
        if self.split == "train":
            if rng.random() < 0.06:
                pieces = [(rng.choice(T.OPENERS[lang]) + rng.choice((" ", " ", "\n")), None),
                          *pieces]
            if self.word_opener_rate and rng.random() < self.word_opener_rate:
                word = rng.choice(lexicon(lang)).capitalize()
                pieces = [(word + rng.choice((":", ",", " -", ":", "!")) +
                           rng.choice((" ", " ", "\n")), None), *pieces]
            if rng.random() < 0.1:
                greeting = self.fill(rng.choice(T.GREETINGS[lang]), self.locale_for(lang))
                pieces = [*greeting, (rng.choice((" ", "\n", "\n\n")), None), *pieces]
            if rng.random() < 0.08:
                signoff = self.fill(rng.choice(T.SIGNOFFS[lang]), self.locale_for(lang))
                pieces = [*pieces, (rng.choice((" ", "\n", "\n\n")), None), *signoff]
        return pieces

    def vary(self, pieces: list[Piece]) -> list[Piece]:
        """Case and punctuation noise, applied per piece so that spans stay exact."""
        rng, r = self.rng, self.rng.random()
        if r < 0.07:
            pieces = [(t.lower(), lab) for t, lab in pieces]
        elif r < 0.09:
            pieces = [(t.upper(), lab) for t, lab in pieces]
        elif r < 0.13:  # chat style: lowercase names only
            pieces = [(t.lower() if lab == "PERSON" else t, lab) for t, lab in pieces]
        if rng.random() < 0.1 and pieces and pieces[-1][1] is None:
            pieces[-1] = (pieces[-1][0].rstrip(".!?"), None)
        if self.split == "train":  # training only: title case, line breaks in the context
            r = rng.random()
            if r < 0.03:
                pieces = [(t.title() if lab is None else t, lab) for t, lab in pieces]
            elif r < 0.1:
                pieces = [(re.sub(" ", lambda m: "\n" if rng.random() < 0.15 else " ", t)
                           if lab is None else t, lab) for t, lab in pieces]
            if self.case_rate and rng.random() < self.case_rate:
                upper = rng.random() < 1 / 3
                pieces = [(t.upper() if upper else t.lower(), lab) for t, lab in pieces]
        return [p for p in pieces if p[0]]


def assemble(pieces: list[Piece]) -> Example:
    """Join pieces into a text; labelled pieces become spans (stripped of outer whitespace)."""
    text, spans = "", []
    for piece, label in pieces:
        if label is not None:
            lead = len(piece) - len(piece.lstrip())
            core = piece.strip()
            if core:
                start = len(text) + lead
                spans.append((start, start + len(core), label))
        text += piece
    return Example(text, spans)


# ----------------------------------------------------------------------------- token alignment


def token_labels(offsets: Sequence[tuple[int, int]], special: Sequence[int],
                 spans: Sequence[Span]) -> list[str | None]:
    """BIO tag per token (``None`` for special tokens): every token overlapping a span is in it."""
    tags: list[str | None] = []
    ordered = sorted(spans)
    started: set[int] = set()
    for (start, end), is_special in zip(offsets, special, strict=True):
        if is_special:
            tags.append(None)
            continue
        tag = "O"
        for k, (s, e, label) in enumerate(ordered):
            if start < e and end > s:
                tag = ("I-" if k in started else "B-") + label
                started.add(k)
                break
        tags.append(tag)
    return tags


def encode(enc: Encoding, example: Example, max_len: int, special: int = IGNORE
           ) -> tuple[list[int], list[int]]:
    """Token ids and label ids of ``example`` from its encoding, truncated to ``max_len``;
    special tokens get label ``special`` (training uses O so that every output row means
    something; evaluation skips them)."""
    tags = token_labels(enc.offsets, enc.special_tokens_mask, example.spans)
    ids = enc.ids
    labels = [special if t is None else LABEL2ID[t] for t in tags]
    if len(ids) > max_len:  # keep [CLS] ... [SEP]
        ids = ids[:max_len - 1] + ids[-1:]
        labels = labels[:max_len - 1] + [special]
    return ids, labels


def load_jsonl(path: Path) -> list[Example]:
    """Examples from ``{"text": ..., "entities": [[start, end, label], ...]}`` lines."""
    examples = []
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            examples.append(Example(row["text"], [tuple(s) for s in row["entities"]]))
    return examples


def check_spans(examples: Sequence[Example]) -> None:
    """Raise if a span is empty, out of range, padded with spaces or overlaps another."""
    for ex in examples:
        last = 0
        for s, e, label in sorted(ex.spans):
            piece = ex.text[s:e]
            if not piece or piece != piece.strip() or s < last or label not in ENTITY_TYPES:
                raise ValueError(f"bad span {(s, e, label)} in {ex.text!r}")
            last = e


def iter_texts(examples: Sequence[Example]) -> Callable[[], Iterator[str]]:
    return lambda: (ex.text for ex in examples)


if __name__ == "__main__":  # print a few examples of each split
    for split, seed in (("train", 0), ("heldout", 1)):
        print(f"--- {split}")
        for ex in Generator(split, seed).take(15):
            print(repr(ex.text), [(ex.text[s:e], lab) for s, e, lab in ex.spans])
